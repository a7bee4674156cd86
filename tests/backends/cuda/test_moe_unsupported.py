"""The cuda backend has no mixture-of-experts (or latent attention) kernels yet: compiling Mixtral,
Qwen3-MoE, GPT-OSS or DeepSeek-V3 for it fails with one line naming the first thing it cannot lower,
and leaves no plan behind."""
from __future__ import annotations

import pytest

pytest.importorskip("cuda.bindings")

from click.testing import CliRunner  # noqa: E402


# case -> the line: the first op of its graph the cuda backend cannot lower (GPT-OSS: its YaRN rotary,
# fused into layer 0's qkv_rope, before the sinks and the router)
ERRORS = {"mixtral-moe": "error: cuda backend: op moe_router is not supported",
          "qwen3-moe": "error: cuda backend: op moe_router is not supported",
          "gpt-oss-sinks-yarn": "error: cuda backend: yarn rope scaling is not supported",
          # DeepSeek-V3: the split of its fused q_a / kv_a projection, before the latent attention ops
          "deepseek-v3-mla": "error: cuda backend: op split is not supported"}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_moe_plan_is_a_one_line_error(case, tmp_path):
    from hf_tiny import make_model

    from reft.cli.reftc import main

    model, _ = make_model(case, tmp_path / "hf")
    r = CliRunner().invoke(main, ["compile", str(model), "-o", str(tmp_path / "plan"), "--backend", "cuda",
                                  "--dtype", "bfloat16"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert r.output.strip().splitlines() == [ERRORS[case]]
    assert not (tmp_path / "plan").exists()


def test_attention_sinks_are_a_one_line_error(tmp_path):
    """GPT-OSS without YaRN: the sinks of layer 0's attention are what the cuda backend refuses."""
    import json

    from hf_tiny import make_model

    from reft.cli.reftc import main

    model, _ = make_model("gpt-oss-sinks-yarn", tmp_path / "hf")
    cfg = json.loads((model / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (model / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(main, ["compile", str(model), "-o", str(tmp_path / "plan"), "--backend", "cuda",
                                  "--dtype", "bfloat16"])
    assert r.exit_code != 0 and r.output.strip().splitlines() == ["error: cuda backend: attention sinks are not supported"]
    assert not (tmp_path / "plan").exists()
