"""GPT-OSS's released config (transformers 4.55 keys: rope_theta + rope_scaling, the mxfp4
quantization_config) reads the same as after transformers 5 loads and saves it again, into the
layer types, YaRN attributes and expert settings transformers uses; settings reft refuses name
themselves in one line."""
from __future__ import annotations

import json
import math

import pytest

from reft.compiler import model_config
from reft.errors import ModelError
from reft.frontends.config import load_hf_config, normalize_rope
from reft.frontends.source import open_source
from reft_models import gpt_oss

transformers = pytest.importorskip("transformers")

GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "use_cache": True, "vocab_size": 201088}


def write(folder, cfg: dict):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_hub_config_reads_as_transformers_5_resaves_it(tmp_path):
    hub = write(tmp_path / "hub", GPT_OSS_20B)
    resaved = tmp_path / "resaved"
    transformers.AutoConfig.from_pretrained(hub).save_pretrained(resaved)
    assert gpt_oss.Config.from_hf(load_hf_config(hub)) == gpt_oss.Config.from_hf(load_hf_config(resaved))


def test_what_the_hub_config_becomes():
    c = gpt_oss.Config.from_hf(normalize_rope(GPT_OSS_20B, "config.json"))
    assert (c.num_local_experts, c.num_experts_per_tok, c.intermediate_size, c.head_dim) == (32, 4, 2880, 64)
    assert (c.swiglu_alpha, c.swiglu_limit, c.attention_bias, c.split_experts) == (1.702, 7.0, True, False)
    assert c.sliding_windows == (128, 0) * 12 and c.max_position_embeddings == 131072
    rope = dict(c.rope)
    assert rope["scaling"] == "yarn" and rope["truncate"] is False and rope["original_max_position"] == 4096
    assert (rope["factor"], rope["beta_fast"], rope["beta_slow"], rope["theta"]) == (32.0, 32.0, 1.0, 150000.0)
    assert rope["attention_factor"] == pytest.approx(0.1 * math.log(32) + 1)


def test_layer_types_default_as_transformers_builds_them():
    cfg = {k: v for k, v in GPT_OSS_20B.items() if k != "layer_types"}
    want = transformers.GptOssConfig(num_hidden_layers=5, sliding_window=128).layer_types
    c = gpt_oss.Config.from_hf(normalize_rope({**cfg, "num_hidden_layers": 5}, "config.json"))
    assert c.sliding_windows == tuple(128 if t == "sliding_attention" else 0 for t in want)


@pytest.mark.parametrize("change,message", [
    ({"num_experts_per_tok": 33}, "num_experts_per_tok 33 must be in 1..32"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic' is not supported"),
    ({"layer_types": ["full_attention"] * 3}, "layer_types has 3 entries for 24 layers"),
])
def test_refused_configs_are_one_line(change, message, tmp_path):
    folder = write(tmp_path / "m", {**GPT_OSS_20B, **change})
    with pytest.raises(ModelError, match=message) as e:
        model_config(open_source(folder))
    assert "\n" not in str(e.value)
