"""`pip install .` (not only editable) ships everything: model definitions, bundled model, license."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out,
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    return next(out.glob("reft-*.whl"))


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("reft_models/__init__.py", "reft_models/llama.py", "reft_models/mistral.py", "reft_models/qwen2.py",
              "reft_models/qwen3.py", "reft/assets/stories260K/model.safetensors",
              "reft/assets/stories260K/tokenizer.json", "reft/assets/stories260K/LICENSE",
              "reft/assets/stories260K/PROVENANCE.md", "reft/ir/ops/attention.py",
              "reft/backends/cpu/templates/forward.cpp.j2", "reft/backends/cpu/templates/linear.h",
              "reft/server/static/index.html"):
        assert f in names, f
    assert not any(n.startswith(("tests/", "models/")) for n in names)


def test_installed_wheel_compiles_and_runs(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, wheel],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import reft, reft_models; assert reft.__file__.startswith(%r), reft.__file__\n"
            "from reft.cli.reftc import main; main(['compile', 'stories260K', '-o', 'plan'], standalone_mode=False)\n"
            % str(target))
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, timeout=300)
    p = subprocess.run([sys.executable, "-m", "reft.cli.reft", "run", "plan", "-p", "Once upon a time",
                        "--temperature", "0", "-n", "12"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert "little girl named Lily" in p.stdout
