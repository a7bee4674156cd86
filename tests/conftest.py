"""Shared fixtures. Tiny random-weight Hugging Face models are built by tests/hf_tiny.py."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))  # tests import their helpers (hf_tiny, strategies) by name


def pytest_collection_modifyitems(config, items):
    from reft.backends.cuda.backend import local_arch

    if local_arch() is None:   # no cuda-python, no driver, or no device

        skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    from reft.compiler import ASSETS

    return ASSETS / "stories260K"


@pytest.fixture(scope="session")
def stories_reference() -> dict:
    """What transformers produces for the bundled model (copied from shared/models)."""
    import json

    return json.loads((TESTS / "data" / "stories260K_reference_outputs.json").read_text())


@pytest.fixture(scope="session")
def stories_plan(tmp_path_factory, stories_dir) -> Path:
    from reft.compiler import compile_model

    out = tmp_path_factory.mktemp("plans") / "stories"
    return compile_model(stories_dir, out, progress=False)


@pytest.fixture
def copy_dir(tmp_path):
    def copy(src: Path, name: str = "model") -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        for p in dst.iterdir():
            p.chmod(0o644)
        return dst
    return copy
