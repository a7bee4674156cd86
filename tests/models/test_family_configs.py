"""Gemma 2, Gemma 3 and Phi-3 configs as the Hub's checkpoints carry them (transformers 4.x keys:
rope_theta + rope_scaling, rope_local_base_freq, sliding_window_pattern, no layer_types) read the
same as transformers 5 reads them: each file is loaded and saved again by
transformers (which writes rope_parameters and layer_types with its own defaults filled in), and
both give one reft Config. Plus the settings reft refuses."""
from __future__ import annotations

import json
import math

import pytest

from reft.frontends.config import load_hf_config, normalize_rope
from reft_models import gemma2, gemma3, phi3

transformers = pytest.importorskip("transformers")

GEMMA2_2B = {"architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attn_logit_softcapping": 50.0,
             "bos_token_id": 2, "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256,
             "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
             "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2",
             "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0,
             "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
             "vocab_size": 256000}
GEMMA3_4B = {"architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attn_logit_softcapping": None,
             "bos_token_id": 2, "eos_token_id": [1, 106], "final_logit_softcapping": None, "head_dim": 256,
             "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2560, "intermediate_size": 10240,
             "max_position_embeddings": 131072, "model_type": "gemma3_text", "num_attention_heads": 8,
             "num_hidden_layers": 34, "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256,
             "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
             "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
             "rope_theta": 1000000.0, "sliding_window": 1024, "sliding_window_pattern": 6, "vocab_size": 262208}
PHI3_128K = {"architectures": ["Phi3ForCausalLM"], "bos_token_id": 1, "eos_token_id": 32000, "hidden_act": "silu",
             "hidden_size": 3072, "intermediate_size": 8192, "max_position_embeddings": 131072, "model_type": "phi3",
             "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
             "original_max_position_embeddings": 4096, "pad_token_id": 32000, "rms_norm_eps": 1e-05,
             "rope_scaling": {"long_factor": [1.0 + i / 8 for i in range(48)],
                              "short_factor": [1.0 + i / 100 for i in range(48)], "type": "longrope"},
             "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": False, "vocab_size": 32064}


def load_hf_config_dict(cfg: dict) -> dict:
    return normalize_rope(cfg, "config.json")


def write(folder, cfg: dict):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("family,cfg", [(gemma2, GEMMA2_2B), (gemma3, GEMMA3_4B), (phi3, PHI3_128K)],
                         ids=["gemma2", "gemma3", "phi3"])
def test_hub_config_reads_as_transformers_5_resaves_it(family, cfg, tmp_path):
    hub = write(tmp_path / "hub", cfg)
    resaved = tmp_path / "resaved"
    transformers.AutoConfig.from_pretrained(hub).save_pretrained(resaved)
    assert "rope_parameters" in json.loads((resaved / "config.json").read_text())
    a, b = family.Config.from_hf(load_hf_config(hub)), family.Config.from_hf(load_hf_config(resaved))
    assert a == b


def test_what_the_hub_configs_become():
    g2 = gemma2.Config.from_hf(load_hf_config_dict(GEMMA2_2B))
    assert g2.sliding_windows[:3] == (4096, 0, 4096) and g2.attn_softcap == 50.0 and g2.final_softcap == 30.0
    assert g2.attn_scale == 256 ** -0.5 and g2.norm_offset == 1.0 and g2.tie_word_embeddings
    g3 = gemma3.Config.from_hf(load_hf_config_dict(GEMMA3_4B))
    assert g3.sliding_windows[:6] == (1024,) * 5 + (0,) and g3.qk_norm and g3.final_softcap == 0.0
    local, full = dict(g3.ropes[0]), dict(g3.ropes[5])
    assert (local["theta"], local["scaling"]) == (10000.0, "default")
    assert (full["theta"], full["scaling"], full["factor"]) == (1000000.0, "linear", 8.0)
    p = dict(phi3.Config.from_hf(load_hf_config_dict(PHI3_128K)).rope)
    assert p["scaling"] == "longrope" and p["original_max_position"] == 4096 and len(p["long_factor"]) == 48
    assert p["attention_factor"] == pytest.approx((1 + math.log(32) / math.log(4096)) ** 0.5)


@pytest.mark.parametrize("family,cfg,change,message", [
    (gemma2, GEMMA2_2B, {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    (gemma2, GEMMA2_2B, {"hidden_activation": "relu"}, "hidden_activation 'relu'"),
    (gemma3, GEMMA3_4B, {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic'"),
    (phi3, PHI3_128K, {"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
     "short_factor and long_factor lists of 48"),
    (phi3, PHI3_128K, {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
], ids=["bidirectional", "activation", "gemma3-rope", "factors", "phi3-rope"])
def test_unsupported_settings_name_themselves(family, cfg, change, message):
    with pytest.raises(ValueError, match=message):
        family.Config.from_hf(load_hf_config_dict({**cfg, **change}))
