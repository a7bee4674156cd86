"""Tiny random-weight Hugging Face models of every supported family, built inside the tests,
and what transformers (the independent reference) computes for them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

STORIES_TOKENIZER = Path(__file__).parent.parent / "reft" / "assets" / "stories260K"

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, initializer_range=0.15, bos_token_id=1, eos_token_id=2)

# name -> (config class, model class, overrides): the parity suite's configurations
CASES = {
    # GQA, head_dim != hidden/heads, untied embeddings, llama3 rope scaling
    "llama-gqa-llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        head_dim=32, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    # tied embeddings, MHA, linear rope scaling, biases everywhere, legacy rope_theta/rope_scaling layout
    "llama-tied-linear-legacy": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    # sliding window shorter than the prompt, GQA
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(
        head_dim=24, sliding_window=12, tie_word_embeddings=False)),
    # q/k/v bias, tied embeddings, GQA
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    # per-head q/k RMSNorm, explicit head_dim
    "qwen3-qknorm": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=40, num_attention_heads=8,
                                                            tie_word_embeddings=False)),
    # (1 + w) norms before and after each sublayer, sqrt(hidden) embedding scale, GeGLU,
    # query_pre_attn_scalar != head_dim, attention and final logit soft-capping small enough to bite,
    # sliding layers (0 and 2) with a window shorter than the prompt, tied embeddings
    "gemma2-softcap-window": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        num_hidden_layers=3, head_dim=24, query_pre_attn_scalar=20, sliding_window=10,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, tie_word_embeddings=True)),
    # per-head (1 + w) q/k norms; sliding layers (window shorter than the prompt) rotating with their own
    # base, the global layer with another base and linear scaling; final soft-capping; untied head
    "gemma3-local-global": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24, sliding_window=10,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
        final_logit_softcapping=4.0, tie_word_embeddings=False)),
    # fused qkv_proj / gate_up_proj weights, partial rotary, longrope whose original context (6) every
    # test prompt exceeds, so the long factors and the attention factor apply (the short factors:
    # tests/models/test_longrope.py)
    "phi3-longrope": ("Phi3Config", "Phi3ForCausalLM", dict(
        partial_rotary_factor=0.5, original_max_position_embeddings=6, pad_token_id=None, tie_word_embeddings=False,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.25, 1.5, 2.0],
                         "long_factor": [1.0, 3.0, 6.0, 12.0]})),
    # 6 experts, top-2 renormalised, per-expert checkpoint tensors stacked at load; sliding window
    # shorter than the prompt on every layer
    "mixtral-moe": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_local_experts=6, num_experts_per_tok=2, sliding_window=12, tie_word_embeddings=False)),
    # 8 experts of width 32, top-3 with norm_topk_prob, per-head q/k RMSNorm, layer 1 dense
    # (mlp_only_layers) with the MLP width intermediate_size
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_hidden_layers=3, head_dim=24, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
        norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=False)),
    # 8 experts of width 32 with biases, top-4 by softmax over the chosen logits (biased router); clamped
    # SwiGLU with a limit small enough to clip and its own alpha; attention sinks (perturbed well away
    # from their small init); biased q/k/v/o; sliding (window 8, shorter than the prompt) and full
    # layers alternating; YaRN with a non-trivial ramp (fractional bounds: no truncation)
    "gpt-oss-sinks-yarn": ("GptOssConfig", "GptOssForCausalLM", dict(
        num_hidden_layers=3, head_dim=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=4,
        sliding_window=8, swiglu_limit=1.0, swiglu_alpha=1.5, max_position_embeddings=4096,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 512},
        tie_word_embeddings=False)),
    # multi-head latent attention (q_lora path, latent 32, rope 16 interleaved, nope 32, v 24 != qk 48) with
    # yarn rope whose mscale_all_dim scales the softmax (and, != mscale, cos and sin);
    # layer 0 dense, layers 1-2: 8 experts in 4 groups, the best 2 groups kept, top-3 by sigmoid score
    # plus a (perturbed) correction bias, normalised and scaled by 2.5, one shared expert
    "deepseek-v3-mla": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        num_hidden_layers=3, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16,
        qk_nope_head_dim=32, v_head_dim=24, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
        moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                         "mscale_all_dim": 0.5, "original_max_position_embeddings": 64})),
}


# mixture-of-experts families are inference-only (their routing and expert ops have no gradient rules)
INFERENCE_ONLY = {"MixtralForCausalLM", "Qwen3MoeForCausalLM", "GptOssForCausalLM", "DeepseekV3ForCausalLM"}
TRAIN_CASES = sorted(c for c, (_, model, _) in CASES.items() if model not in INFERENCE_ONLY)


def make_model(case: str, out: Path, seed: int = 0):
    """Write a random-weight model folder (config, safetensors, stories260K tokenizer). Returns (dir, hf model)."""
    import torch
    import transformers

    cfg_cls, model_cls, over = CASES[case]
    cfg = getattr(transformers, cfg_cls)(**{**BASE, **over})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # norms and biases away from their trivial init so they matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith((".bias", "_bias")):
                p.add_(torch.randn_like(p) * 0.2)
            if name.endswith("self_attn.sinks"):      # GPT-OSS: a logit per head, to weigh like a key's
                p.add_(torch.randn_like(p) * 1.5)
        for name, buf in model.named_buffers():   # DeepSeek-V3's routing bias (zero at init)
            if name.endswith("e_score_correction_bias"):
                buf.add_(torch.randn_like(buf) * 0.2)
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES_TOKENIZER / f, out / f)
        (out / f).chmod(0o644)
    if case.endswith("legacy"):
        to_legacy_rope(out / "config.json")
    return out, model


def to_legacy_rope(path: Path) -> None:
    """Rewrite transformers-5 `rope_parameters` into the `rope_theta` + `rope_scaling` layout most
    Hub checkpoints carry."""
    c = json.loads(path.read_text())
    rp = dict(c.pop("rope_parameters"))
    c["rope_theta"] = rp.pop("rope_theta")
    kind = rp.pop("rope_type")
    c["rope_scaling"] = None if kind == "default" else {"type": kind, **rp}
    path.write_text(json.dumps(c, indent=2))


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens, recomputing the whole sequence each step (no cache: independent of ours)."""
    ids = list(ids)
    out = []
    for _ in range(n):
        t = int(np.argmax(hf_logits(model, ids)[-1]))
        out.append(t)
        ids.append(t)
    return out


def hf_mean_nll(model, ids: list[int]) -> float:
    z = hf_logits(model, ids).astype(np.float64)[:-1]
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return float(np.mean(lse - z[np.arange(len(ids) - 1), ids[1:]]))
