"""Bad input ends in one clear error line and a non-zero exit, never a traceback, and never
leaves a half-written plan at the output path."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args, stdin=None):
    tool = {"reftc": "reft.cli.reftc", "reft": "reft.cli.reft"}[args[0]]
    return subprocess.run([sys.executable, "-m", tool, *map(str, args[1:])], capture_output=True, text=True,
                          input=stdin, timeout=120)


def assert_one_error(p, *needles):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def no_leftovers(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_missing_directory(tmp_path):
    out = tmp_path / "plan"
    assert_one_error(run("reftc", "compile", tmp_path / "nope", "-o", out), "nope", "no such model directory")
    no_leftovers(out)


def test_missing_config(tmp_path):
    (tmp_path / "m").mkdir()
    assert_one_error(run("reftc", "compile", tmp_path / "m", "-o", tmp_path / "plan"), "config.json")
    no_leftovers(tmp_path / "plan")


def test_invalid_config(copy_dir, stories_dir, tmp_path):
    m = copy_dir(stories_dir)
    (m / "config.json").write_text("{ not json")
    assert_one_error(run("reftc", "compile", m, "-o", tmp_path / "plan"), "config.json")
    no_leftovers(tmp_path / "plan")


def test_config_missing_key(copy_dir, stories_dir, tmp_path):
    m = copy_dir(stories_dir)
    c = json.loads((m / "config.json").read_text())
    del c["hidden_size"]
    (m / "config.json").write_text(json.dumps(c))
    assert_one_error(run("reftc", "compile", m, "-o", tmp_path / "plan"), "hidden_size")


def test_unsupported_architecture_lists_supported(copy_dir, stories_dir, tmp_path):
    m = copy_dir(stories_dir)
    c = json.loads((m / "config.json").read_text())
    c["architectures"] = ["GPT2LMHeadModel"]
    (m / "config.json").write_text(json.dumps(c))
    p = run("reftc", "compile", m, "-o", tmp_path / "plan")
    assert_one_error(p, "GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                     "Qwen3ForCausalLM")
    no_leftovers(tmp_path / "plan")


def test_missing_safetensors(copy_dir, stories_dir, tmp_path):
    m = copy_dir(stories_dir)
    (m / "model.safetensors").unlink()
    assert_one_error(run("reftc", "compile", m, "-o", tmp_path / "plan"), "safetensors")
    no_leftovers(tmp_path / "plan")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(copy_dir, stories_dir, tmp_path, damage):
    m = copy_dir(stories_dir)
    f = m / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"garbage": b"\x07" * 4096, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    assert_one_error(run("reftc", "compile", m, "-o", tmp_path / "plan"), "model.safetensors")
    no_leftovers(tmp_path / "plan")


def test_weight_shapes_disagree_with_config(copy_dir, stories_dir, tmp_path):
    m = copy_dir(stories_dir)
    c = json.loads((m / "config.json").read_text())
    c["intermediate_size"] = 128
    (m / "config.json").write_text(json.dumps(c))
    assert_one_error(run("reftc", "compile", m, "-o", tmp_path / "plan"), "shape", "mlp")
    no_leftovers(tmp_path / "plan")


def test_failed_compile_keeps_existing_plan(copy_dir, stories_dir, tmp_path):
    out = tmp_path / "plan"
    assert run("reftc", "compile", stories_dir, "-o", out).returncode == 0
    manifest = (out / "manifest.json").read_text()
    m = copy_dir(stories_dir)
    (m / "model.safetensors").write_bytes(b"\0" * 100)
    assert_one_error(run("reftc", "compile", m, "-o", out), "model.safetensors")
    assert (out / "manifest.json").read_text() == manifest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".plan.")]


def test_refuses_to_overwrite_a_non_plan_directory(stories_dir, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert_one_error(run("reftc", "compile", stories_dir, "-o", out), "not a reft plan")
    assert (out / "notes.txt").read_text() == "keep me"


def test_plan_from_another_format_version(stories_plan, tmp_path):
    import shutil

    plan = tmp_path / "old"
    shutil.copytree(stories_plan, plan)
    m = json.loads((plan / "manifest.json").read_text())
    m["format_version"] = 999
    (plan / "manifest.json").write_text(json.dumps(m))
    assert_one_error(run("reft", "run", plan, "--prompt", "hi"), "format version 999")
    assert_one_error(run("reftc", "inspect", plan), "format version 999")


def test_not_a_plan(tmp_path):
    assert_one_error(run("reft", "run", tmp_path, "--prompt", "hi"), "not a reft plan")


def test_prompt_longer_than_context(stories_plan):
    assert_one_error(run("reft", "run", stories_plan, "--prompt", "Lily " * 2100), "context")


def test_perplexity_missing_file(stories_plan, tmp_path):
    assert_one_error(run("reft", "perplexity", stories_plan, "-f", tmp_path / "none.txt"), "none.txt")


def test_chat_without_template(stories_plan):
    assert_one_error(run("reft", "run", stories_plan, "--chat", stdin="hello\n"), "chat template")


def test_unknown_model_def(stories_dir, tmp_path):
    assert_one_error(run("reftc", "compile", stories_dir, "-o", tmp_path / "p", "--model-def", tmp_path / "x.py"),
                     "x.py")
