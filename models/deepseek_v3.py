"""DeepSeek-V3 (DeepseekV3ForCausalLM): multi-head latent attention and a mixture of experts with
shared experts, sigmoid scores and group-limited routing.

Notable (what differs from Llama):
- **Multi-head latent attention (MLA).** Queries come from a low-rank path (q_a_proj -> RMSNorm ->
  q_b_proj; q_proj when q_lora_rank is None). Keys and values share one compressed latent per token:
  kv_a_proj_with_mqa gives c_kv (kv_lora_rank, RMS-normalised) and one rope key k_rot
  (qk_rope_head_dim) shared by every head; kv_b_proj expands c_kv into each head's k_nope
  (qk_nope_head_dim) and v (v_head_dim). A head's key is [k_nope; k_rot], its query [q_nope; q_rot],
  the scale 1/sqrt(qk_nope + qk_rope) (times yarn's mscale^2). This file writes that naive form
  (expand, then ordinary causal attention); the `absorb_latent_attention` pass turns it into attention
  over the latent itself, so the paged KV cache stores one [kv_lora_rank + qk_rope_head_dim] vector
  per token, not the heads (reft/passes/absorb_latent_attention.py).
- The latent norms (q_a_layernorm, kv_a_layernorm) use eps 1e-6 whatever rms_norm_eps says, as
  transformers builds them.
- **Interleaved rope** (rope_interleave, the default): the rotary dims are pairs (x0, x1), (x2, x3), ...;
  transformers rotates them and returns the halves layout, which is the rotate-half rope applied after
  de-interleaving (a reshape / transpose / reshape here).
- **Routing** (moe_router mode sigmoid_group_topk): sigmoid scores plus `e_score_correction_bias` for
  choosing only; the n_group expert groups are scored by their two best biased scores, the best
  topk_group groups stay, and the num_experts_per_tok best experts among them are chosen; weights are
  the unbiased scores, normalised with norm_topk_prob, times routed_scaling_factor.
- **Shared experts**: a dense SwiGLU MLP of width n_shared_experts * moe_intermediate_size added to
  the routed output. The first `first_k_dense_replace` layers are dense (width intermediate_size).
- GGUF (llama.cpp's `deepseek2`): experts stacked, the correction bias is `exp_probs_b`; files from
  newer converters split kv_b_proj into attn_k_b [H, kv_lora_rank, qk_nope] (per head transposed) and
  attn_v_b [H, v_head_dim, kv_lora_rank], which the frontend joins back (GGUF_JOINED). llama.cpp's
  graph uses the file's RMS eps for the latent norms too; reft follows transformers (1e-6).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .llama import ACTIVATIONS, decoder, linear, rope_attrs

ARCHITECTURES = ("DeepseekV3ForCausalLM",)

GGUF_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_q_a.weight": "model.layers.{i}.self_attn.q_a_proj.weight",
    "blk.{i}.attn_q_a_norm.weight": "model.layers.{i}.self_attn.q_a_layernorm.weight",
    "blk.{i}.attn_q_b.weight": "model.layers.{i}.self_attn.q_b_proj.weight",
    "blk.{i}.attn_kv_a_mqa.weight": "model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight",
    "blk.{i}.attn_kv_a_norm.weight": "model.layers.{i}.self_attn.kv_a_layernorm.weight",
    "blk.{i}.attn_kv_b.weight": "model.layers.{i}.self_attn.kv_b_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.ffn_gate_inp.weight": "model.layers.{i}.mlp.gate.weight",
    "blk.{i}.exp_probs_b.bias": "model.layers.{i}.mlp.gate.e_score_correction_bias",
    "blk.{i}.ffn_gate_exps.weight": "model.layers.{i}.mlp.experts.*.gate_proj.weight",
    "blk.{i}.ffn_up_exps.weight": "model.layers.{i}.mlp.experts.*.up_proj.weight",
    "blk.{i}.ffn_down_exps.weight": "model.layers.{i}.mlp.experts.*.down_proj.weight",
    "blk.{i}.ffn_gate_shexp.weight": "model.layers.{i}.mlp.shared_experts.gate_proj.weight",
    "blk.{i}.ffn_up_shexp.weight": "model.layers.{i}.mlp.shared_experts.up_proj.weight",
    "blk.{i}.ffn_down_shexp.weight": "model.layers.{i}.mlp.shared_experts.down_proj.weight",
}
GGUF_ARCHITECTURES = {"deepseek2": "DeepseekV3ForCausalLM"}
GGUF_EXPERTS = True
GGUF_ROPE_PERMUTED = ()
# `deepseek2.*` metadata this family reads beyond the common keys (reft/frontends/gguf.py)
GGUF_HPARAMS = {
    "attention.q_lora_rank": "q_lora_rank", "attention.kv_lora_rank": "kv_lora_rank",
    "attention.key_length_mla": "key_length_mla", "attention.value_length_mla": "value_length_mla",
    "attention.value_length": "value_length", "rope.dimension_count": "qk_rope_head_dim",
    "leading_dense_block_count": "first_k_dense_replace", "expert_shared_count": "n_shared_experts",
    "expert_weights_scale": "routed_scaling_factor", "expert_weights_norm": "norm_topk_prob",
    "expert_gating_func": "expert_gating_func", "expert_group_count": "n_group",
    "expert_group_used_count": "topk_group", "rope.scaling.yarn_log_multiplier": "yarn_log_multiplier",
}
GGUF_GATING_SIGMOID = 2          # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID

LATENT_EPS = 1e-6                # q_a_layernorm / kv_a_layernorm: DeepseekV3RMSNorm's default eps


def join_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """kv_b_proj [H * (Dn + Dv), C] from llama.cpp's attn_k_b [H, C, Dn] and attn_v_b [H, Dv, C]."""
    H, C, _ = k_b.shape
    return np.concatenate([np.swapaxes(k_b, 1, 2), v_b], axis=1).reshape(-1, C)


GGUF_JOINED = {"blk.{i}.attn_kv_b.weight": (("blk.{i}.attn_k_b.weight", "blk.{i}.attn_v_b.weight"), join_kv_b)}


@dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int           # the dense layers' MLP width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int         # = heads: MLA expands every head from the latent
    head_dim: int                    # qk_nope_head_dim + qk_rope_head_dim
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: tuple                      # attrs of the rope op on the qk_rope_head_dim dims
    hidden_act: str
    q_lora_rank: int                 # 0: q_proj (no low-rank query path)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    attention_bias: bool             # q_a_proj, kv_a_proj_with_mqa, o_proj
    rope_interleave: bool
    softmax_scale: float
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    n_shared_experts: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    first_k_dense_replace: int

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "Config":
        """From a normalised config.json; absent keys take DeepseekV3Config's defaults."""
        act = hf.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported (supported: {sorted(ACTIVATIONS)})")
        heads = hf.get("num_attention_heads", 128)
        nope, rot, v = hf.get("qk_nope_head_dim", 128), hf.get("qk_rope_head_dim", 64), hf.get("v_head_dim", 128)
        rope = rope_attrs({k: x for k, x in hf.items() if k != "partial_rotary_factor"}, rot)
        kw = dict(
            vocab_size=hf.get("vocab_size", 129280), hidden_size=hf.get("hidden_size", 7168),
            intermediate_size=hf.get("intermediate_size", 18432), num_hidden_layers=hf.get("num_hidden_layers", 61),
            num_attention_heads=heads, num_key_value_heads=heads, head_dim=nope + rot,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), rope=rope, hidden_act=ACTIVATIONS[act],
            q_lora_rank=hf.get("q_lora_rank", 1536) or 0, kv_lora_rank=hf.get("kv_lora_rank", 512),
            qk_nope_head_dim=nope, qk_rope_head_dim=rot, v_head_dim=v,
            attention_bias=bool(hf.get("attention_bias", False)),
            rope_interleave=bool(hf.get("rope_interleave", True)),
            softmax_scale=softmax_scale(hf, nope + rot),
            n_routed_experts=hf.get("n_routed_experts") or hf.get("num_local_experts") or 256,
            num_experts_per_tok=hf.get("num_experts_per_tok", 8),
            moe_intermediate_size=hf.get("moe_intermediate_size", 2048),
            n_shared_experts=hf.get("n_shared_experts", 1) or 0, n_group=hf.get("n_group", 8) or 1,
            topk_group=hf.get("topk_group", 4) or 1, norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 2.5)),
            first_k_dense_replace=hf.get("first_k_dense_replace", 3) or 0,
        )
        kw.update(overrides)
        cfg = cls(**kw)
        E, G = cfg.n_routed_experts, cfg.n_group
        if E % G or not 0 < cfg.topk_group <= G or not 0 < cfg.num_experts_per_tok <= cfg.topk_group * (E // G):
            raise ValueError(f"{E} experts in {G} groups with topk_group {cfg.topk_group} cannot give"
                             f" num_experts_per_tok {cfg.num_experts_per_tok}")
        if rot % 2:
            raise ValueError(f"qk_rope_head_dim {rot} must be even")
        return cfg


def softmax_scale(hf: dict, qk_head_dim: int) -> float:
    """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under a scaled rope with
    mscale_all_dim set (transformers' yarn_apply_mscale)."""
    scale = qk_head_dim ** -0.5
    s = hf.get("rope_scaling") or {}
    m = s.get("mscale_all_dim") or 0
    if s.get("rope_type", "default") != "default" and m and s.get("factor", 1.0) > 1:
        mscale = 0.1 * m * math.log(s["factor"]) + 1.0
        scale *= mscale * mscale
    return scale


def gguf_config(cfg: dict) -> dict:
    """The HF config keys from llama.cpp's deepseek2 metadata: head dims from the MLA key / value
    lengths (files without them: key_length = qk_nope + qk_rope, value_length = v_head_dim); the
    rotary layout is always interleaved; only sigmoid gating is DeepSeek-V3's. YaRN's
    yarn_log_multiplier is 0.1 * mscale_all_dim (convert_hf_to_gguf.py); llama.cpp leaves cos and sin
    unscaled, as transformers does when mscale = mscale_all_dim."""
    cfg = dict(cfg)
    log_mul = cfg.pop("yarn_log_multiplier", None)
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("rope_type") == "yarn":
        m = (log_mul or 0.0) / 0.1
        beta = {k: cfg.pop(f"yarn_{k}") for k in ("beta_fast", "beta_slow") if f"yarn_{k}" in cfg}
        unscaled = {"mscale": m, "mscale_all_dim": m} if m else {"attention_factor": 1.0}
        cfg["rope_scaling"] = {**scaling, **beta, **unscaled}
    rot = cfg["qk_rope_head_dim"]
    key = cfg.pop("key_length_mla", None) or cfg["head_dim"]
    cfg["qk_nope_head_dim"] = key - rot
    cfg["v_head_dim"] = cfg.pop("value_length_mla", None) or cfg["value_length"]
    cfg.pop("value_length", None)
    cfg.pop("partial_rotary_factor", None)
    cfg["n_routed_experts"] = cfg.pop("num_local_experts")
    cfg["rope_interleave"] = True
    # what llama.cpp's loader does without the key (not DeepseekV3Config's defaults)
    cfg["q_lora_rank"] = cfg.get("q_lora_rank") or None
    cfg["norm_topk_prob"] = bool(cfg.get("norm_topk_prob", False))
    cfg.setdefault("routed_scaling_factor", 1.0)
    cfg.setdefault("first_k_dense_replace", 0)
    cfg.setdefault("n_group", 1)
    cfg.setdefault("topk_group", 1)
    gating = cfg.pop("expert_gating_func", GGUF_GATING_SIGMOID)
    if gating != GGUF_GATING_SIGMOID:
        raise ValueError(f"deepseek2 expert_gating_func {gating} is not supported (DeepSeek-V3's sigmoid only)")
    return cfg


def deinterleave(b, x, H: int, R: int):
    """(T, H, R) with rotary pairs (x0, x1), (x2, x3), ... -> the halves layout (x0, x2, ..., x1, x3, ...)."""
    x = b.reshape(x, shape=("T", H, R // 2, 2))
    return b.reshape(b.transpose(x, perm=(0, 1, 3, 2)), shape=("T", H, R))


def attention(b, cfg: Config, x, pos, sid, p: str):
    """Multi-head latent attention of one layer, written naively: c_kv expanded into every head's K/V."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    C, Dn, R, Dv = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    if cfg.q_lora_rank:
        q = linear(b, x, p + "q_a_proj", D, cfg.q_lora_rank, cfg.attention_bias)              # (T, Q)
        q = b.rms_norm(q, b.param(p + "q_a_layernorm.weight", (cfg.q_lora_rank,)), eps=LATENT_EPS)
        q = linear(b, q, p + "q_b_proj", cfg.q_lora_rank, H * (Dn + R), False)                 # (T, H*(Dn+R))
    else:
        q = linear(b, x, p + "q_proj", D, H * (Dn + R), False)
    q_nope, q_rot = b.split(b.reshape(q, shape=("T", H, Dn + R)), axis=-1, sizes=(Dn, R))    # (T, H, Dn), (T, H, R)
    kv = linear(b, x, p + "kv_a_proj_with_mqa", D, C + R, cfg.attention_bias)                  # (T, C+R)
    c_kv, k_rot = b.split(kv, axis=-1, sizes=(C, R))                                           # (T, C), (T, R)
    c_kv = b.rms_norm(c_kv, b.param(p + "kv_a_layernorm.weight", (C,)), eps=LATENT_EPS)
    k_rot = b.reshape(k_rot, shape=("T", 1, R))                                                # (T, 1, R)
    if cfg.rope_interleave:
        q_rot, k_rot = deinterleave(b, q_rot, H, R), deinterleave(b, k_rot, 1, R)
    rope = dict(cfg.rope)
    q_rot, k_rot = b.rope(q_rot, pos, **rope), b.rope(k_rot, pos, **rope)
    kv = linear(b, c_kv, p + "kv_b_proj", C, H * (Dn + Dv), False)                            # (T, H*(Dn+Dv))
    k_nope, v = b.split(b.reshape(kv, shape=("T", H, Dn + Dv)), axis=-1, sizes=(Dn, Dv))      # (T, H, Dn), (T, H, Dv)
    k_rot_h = b.concat(*[k_rot] * H, axis=1) if H > 1 else k_rot                               # (T, H, R): shared
    k = b.concat(k_nope, k_rot_h, axis=-1)                                                     # (T, H, Dn+R)
    q = b.concat(q_nope, q_rot, axis=-1)
    o = b.causal_attention(q, k, v, pos, sid, scale=cfg.softmax_scale)                         # (T, H, Dv)
    o = b.reshape(o, shape=("T", H * Dv))
    return linear(b, o, p + "o_proj", H * Dv, D, cfg.attention_bias)


def mlp(b, cfg: Config, x, p: str, F: int):
    """SwiGLU MLP of width F under `p` (the dense layers, the shared experts)."""
    D = cfg.hidden_size
    g = linear(b, x, p + "gate_proj", D, F, False)                                             # (T, F)
    u = linear(b, x, p + "up_proj", D, F, False)
    act = b.silu(g) if cfg.hidden_act == "silu" else b.gelu_tanh(g)
    return linear(b, b.mul(act, u), p + "down_proj", F, D, False)                              # (T, D)


def moe(b, cfg: Config, x, p: str):
    """Routed experts (grouped sigmoid routing) plus the shared experts, on x (T, D)."""
    D, E, F, k = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    logits = b.linear(x, b.param(p + "gate.weight", (E, D)))                                   # (T, E)
    bias = b.param(p + "gate.e_score_correction_bias", (E,))
    ids, weights = b.moe_router(logits, bias, top_k=k, mode="sigmoid_group_topk", normalize=cfg.norm_topk_prob,
                                groups=cfg.n_group, topk_groups=cfg.topk_group, scale=cfg.routed_scaling_factor)
    order, offsets = b.moe_dispatch(ids, experts=E)                                            # (T, k), (E + 1,)
    g = b.expert_linear(x, order, offsets, b.param(p + "experts.*.gate_proj.weight", (E, F, D)))   # (T, k, F)
    u = b.expert_linear(x, order, offsets, b.param(p + "experts.*.up_proj.weight", (E, F, D)))
    act = b.silu(g) if cfg.hidden_act == "silu" else b.gelu_tanh(g)
    y = b.expert_linear_sum(b.mul(act, u), order, offsets, weights,
                            b.param(p + "experts.*.down_proj.weight", (E, D, F)))              # (T, D)
    if cfg.n_shared_experts:
        y = b.add(y, mlp(b, cfg, x, p + "shared_experts.", F * cfg.n_shared_experts))
    return y


def build(cfg: Config, b) -> None:
    """The forward entry (llama.decoder) with latent attention, dense MLPs in the first
    first_k_dense_replace layers and the routed MoE after them."""
    decoder(cfg, b, lambda h, pos, sid, p, i: attention(b, cfg, h, pos, sid, p + "self_attn."),
            lambda h, p, i: mlp(b, cfg, h, p + "mlp.", cfg.intermediate_size) if i < cfg.first_k_dense_replace
            else moe(b, cfg, h, p + "mlp."))
