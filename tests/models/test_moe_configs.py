"""Mixtral and Qwen3-MoE configs as the Hub's checkpoints carry them (transformers 4.x keys: rope_theta,
`num_experts` for Qwen3-MoE) read the same as after transformers 5 loads and saves them again
(rope_parameters, `num_local_experts`); which layers are sparse follows transformers' own rule;
settings reft refuses name themselves."""
from __future__ import annotations

import json

import pytest

from reft.frontends.config import load_hf_config, normalize_rope
from reft_models import mixtral, qwen3_moe

transformers = pytest.importorskip("transformers")

MIXTRAL_8X7B = {"architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
                "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
                "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
                "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8,
                "num_local_experts": 8, "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
                "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False,
                "torch_dtype": "bfloat16", "vocab_size": 32000}
QWEN3_30B_A3B = {"architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                 "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
                 "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
                 "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
                 "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True,
                 "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
                 "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
                 "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                 "use_sliding_window": False, "vocab_size": 151936}


def write(folder, cfg: dict):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("family,cfg", [(mixtral, MIXTRAL_8X7B), (qwen3_moe, QWEN3_30B_A3B)], ids=["mixtral", "qwen3"])
def test_hub_config_reads_as_transformers_5_resaves_it(family, cfg, tmp_path):
    hub = write(tmp_path / "hub", cfg)
    resaved = tmp_path / "resaved"
    transformers.AutoConfig.from_pretrained(hub).save_pretrained(resaved)
    assert family.Config.from_hf(load_hf_config(hub)) == family.Config.from_hf(load_hf_config(resaved))


def test_what_the_hub_configs_become():
    m = mixtral.Config.from_hf(normalize_rope(MIXTRAL_8X7B, "config.json"))
    assert (m.num_local_experts, m.num_experts_per_tok, m.moe_intermediate_size) == (8, 2, 14336)
    assert m.norm_topk_prob and m.moe_layers == (True,) * 32 and m.sliding_windows == (0,) * 32
    q = qwen3_moe.Config.from_hf(normalize_rope(QWEN3_30B_A3B, "config.json"))
    assert (q.num_local_experts, q.num_experts_per_tok, q.moe_intermediate_size) == (128, 8, 768)
    assert q.norm_topk_prob and q.qk_norm and q.moe_layers == (True,) * 48 and q.sliding_windows == (0,) * 48


def test_sparse_layers_follow_transformers():
    """decoder_sparse_step and mlp_only_layers pick the dense layers as Qwen3MoeDecoderLayer does."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf = dict(vocab_size=32, hidden_size=16, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=6,
              num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
              decoder_sparse_step=2, mlp_only_layers=[3])
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**hf))
    want = tuple(isinstance(layer.mlp, Qwen3MoeSparseMoeBlock) for layer in model.model.layers)
    assert want == (False, True, False, False, False, True)
    assert qwen3_moe.Config.from_hf(normalize_rope(hf, "config.json")).moe_layers == want


def test_too_many_experts_per_token_names_itself():
    with pytest.raises(ValueError, match="num_experts_per_tok 9 must be in 1..8"):
        mixtral.Config.from_hf(normalize_rope({**MIXTRAL_8X7B, "num_experts_per_tok": 9}, "config.json"))
