"""LoRA adapter slots through the CLIs: `reftc compile --max-loras` and `reft run --prompt --lora`
print the merged model's greedy text; misuse is one error line."""
from __future__ import annotations

import json

import lora_tiny
import pytest
from test_bad_input import assert_one_error, run

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora-cli")
    base, adapters, merged = lora_tiny.build(d / "models")
    p = run("reftc", "compile", base, "-o", d / "slots", "--max-loras", "2", "--max-lora-rank", "8",
            "--lora-targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    assert p.returncode == 0, p.stderr
    p = run("reftc", "compile", merged["beta"], "-o", d / "beta")
    assert p.returncode == 0, p.stderr
    return d, adapters


def test_run_prompt_with_an_adapter_prints_the_merged_models_text(setup):
    d, adapters = setup
    m = json.loads((d / "slots" / "manifest.json").read_text())
    assert m["lora"]["max_loras"] == 2 and m["lora"]["max_rank"] == 8 and len(m["lora"]["modules"]) == 2 * 7
    args = ("--prompt", "Once upon a time", "--temperature", "0", "-n", "12", "--special")
    want = run("reft", "run", d / "beta", *args)
    got = run("reft", "run", d / "slots", *args, "--lora", f"beta={adapters['beta']}")
    assert want.returncode == 0 and got.returncode == 0, got.stderr
    assert got.stdout == want.stdout
    assert run("reft", "run", d / "slots", *args).stdout != want.stdout   # the base model says otherwise


def test_lora_misuse_is_one_error_line(setup, stories_plan):
    d, adapters = setup
    assert_one_error(run("reft", "run", stories_plan, "--prompt", "x", "--lora", f"a={adapters['alpha']}"),
                     "no LoRA adapter slots", "--max-loras")
    assert_one_error(run("reft", "run", d / "slots", "--prompt", "x", "--lora", "nodir"), "NAME=ADAPTER_DIR")
    assert_one_error(run("reft", "run", d / "slots", "--prompt", "x", "--lora", f"a={adapters['alpha']}",
                         "--lora", f"b={adapters['beta']}"), "give --lora once")
    assert_one_error(run("reft", "run", d / "slots", "--prompt", "x", "--lora", f"a={d}"), "adapter_config.json")
    assert_one_error(run("reftc", "compile", "stories260K", "-o", d / "bad", "--max-loras", "1",
                         "--lora-targets", "q_proj,w9"), "no w9")
