"""DeepSeek-V3's config as the Hub's checkpoint carries it (transformers 4.x keys: rope_theta and a
yarn rope_scaling with mscale / mscale_all_dim) reads the same as after transformers 5 loads and saves
it again; what it becomes (the yarn softmax scale, dense layers, routing groups); settings reft
refuses name themselves, and a GGUF with another gating function is refused."""
from __future__ import annotations

import json
import math

import pytest

from reft.frontends.config import load_hf_config, normalize_rope
from reft_models import deepseek_v3

transformers = pytest.importorskip("transformers")

DEEPSEEK_V3 = {"architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
               "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
               "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
               "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
               "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
               "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
               "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
               "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
               "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                                "original_max_position_embeddings": 4096, "type": "yarn"},
               "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
               "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "v_head_dim": 128,
               "vocab_size": 129280}


def read(cfg: dict) -> deepseek_v3.Config:
    return deepseek_v3.Config.from_hf(normalize_rope(cfg, "config.json"))


def test_hub_config_reads_as_transformers_5_resaves_it(tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps(DEEPSEEK_V3))
    resaved = tmp_path / "resaved"
    transformers.AutoConfig.from_pretrained(hub).save_pretrained(resaved)
    assert deepseek_v3.Config.from_hf(load_hf_config(hub)) == deepseek_v3.Config.from_hf(load_hf_config(resaved))


def test_what_the_hub_config_becomes():
    c = read(DEEPSEEK_V3)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (1536, 512, 128, 64, 128)
    assert (c.n_routed_experts, c.n_group, c.topk_group, c.num_experts_per_tok, c.n_shared_experts) == (256, 8, 4, 8, 1)
    assert c.first_k_dense_replace == 3 and c.head_dim == 192 and c.rope_interleave
    rope = dict(c.rope)
    assert rope["scaling"] == "yarn" and rope["rotary_dim"] == 64 and rope["attention_factor"] == 1.0   # mscale = mscale_all_dim
    assert c.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)


@pytest.mark.parametrize("change,message", [
    ({"n_group": 7}, "256 experts in 7 groups"),
    ({"topk_group": 9}, "topk_group 9"),
    ({"num_experts_per_tok": 129, "topk_group": 4}, "num_experts_per_tok 129"),
    ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported"),
])
def test_unsupported_settings_name_themselves(change, message):
    with pytest.raises(ValueError, match=message):
        read({**DEEPSEEK_V3, **change})


def test_gguf_softmax_gating_is_refused():
    """llama.cpp's deepseek2 also holds DeepSeek-V2 (softmax gating, expert_gating_func 1)."""
    cfg = {"head_dim": 192, "qk_rope_head_dim": 64, "value_length": 128, "num_local_experts": 64,
           "expert_gating_func": 1}
    with pytest.raises(ValueError, match="expert_gating_func 1 is not supported"):
        deepseek_v3.gguf_config(cfg)
