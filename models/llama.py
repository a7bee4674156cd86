"""Llama family decoder (LlamaForCausalLM), the base the other shipped families reuse.

Notable:
- One forward graph for every batch shape: `input_ids[T]`, `positions[T]`, `seq_ids[T]`
  (sequence of each token) and `logit_rows[R]` (rows whose logits are wanted). Attention is
  written as `causal_attention` over the batch; the paged-KV pass rewrites it to read and
  write KV-cache pages, so the same definition serves training, prefill and decode.
- Parameter names are the Hugging Face checkpoint names, verbatim. Fusing q/k/v and
  gate/up is a compile-time pass, not something the model writes.
- Tied embeddings reuse `model.embed_tokens.weight` as the LM head.
- GGUF files (llama.cpp) map onto the same names through the GGUF_TENSORS table.
- Options the relatives need are config fields: q/k/v(/o) bias (Qwen2), per-head q/k
  RMSNorm (Qwen3), sliding-window layers (Mistral, Qwen2/3 `layer_types`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

ARCHITECTURES = ("LlamaForCausalLM",)

# llama.cpp's GGUF names -> this family's weight names ({i}: layer index). A file holds the subset its
# model uses (biases for Qwen2, q/k norms for Qwen3; no output.weight when embeddings are tied).
GGUF_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# GGUF `general.architecture` -> the HF architecture this module builds for it
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM"}
# llama.cpp's converter reorders the rows of each q/k head for its interleaved rotary layout
# (pairs (2j, 2j+1) instead of (j, j + D/2)); reading a file undoes it for these weights.
GGUF_ROPE_PERMUTED = ("self_attn.q_proj", "self_attn.k_proj")

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: tuple                          # (("theta", ..), ("scaling", ..), ...) attrs of the rope op
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_windows: tuple = ()          # per layer: 0 = full attention

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "Config":
        """From a normalised config.json (see reft.frontends.config)."""
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        act = hf.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported (supported: {sorted(ACTIVATIONS)})")
        bias = bool(hf.get("attention_bias", False))
        kw = dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope=rope_attrs(hf, head_dim), hidden_act=ACTIVATIONS[act],
            qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_windows=sliding_windows(hf),
        )
        kw.update(overrides)
        return cls(**kw)


def rope_attrs(hf: dict, head_dim: int, theta: float | None = None, scaling: dict | None = None) -> tuple:
    """The rope op's attributes from a normalised config, or from one layer type's own `theta` and
    `scaling` (a rope_scaling dict) where a family has several."""
    s = (hf.get("rope_scaling") if scaling is None else scaling) or {"rope_type": "default"}
    kind = s.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    a = {"theta": float(hf.get("rope_theta", 10000.0) if theta is None else theta),
         "rotary_dim": int(head_dim * (hf.get("partial_rotary_factor") or 1.0)), "scaling": kind}
    if kind in ("linear", "llama3"):
        a["factor"] = float(s["factor"])
    if kind == "llama3":
        a["low_freq_factor"] = float(s["low_freq_factor"])
        a["high_freq_factor"] = float(s["high_freq_factor"])
        a["original_max_position"] = int(s["original_max_position_embeddings"])
    if kind == "yarn":
        a.update(yarn_attrs(hf, s))
    return tuple(sorted(a.items()))


def yarn_attrs(hf: dict, s: dict) -> dict:
    """YaRN's rope attributes as transformers' _compute_yarn_parameters reads them: factor (or
    max / original positions), beta_fast / beta_slow (32 / 1), truncate (True), and the cos/sin
    scale: attention_factor if given, else 0.1 ln(factor) + 1, or with mscale and mscale_all_dim
    the ratio of those two scales (DeepSeek)."""
    orig = int(s.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
               or hf["max_position_embeddings"])
    factor = float(s.get("factor") or hf["max_position_embeddings"] / orig)

    def mscale(m=1.0):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn = mscale(m) / mscale(m_all) if m and m_all else mscale()
    return {"factor": factor, "original_max_position": orig, "attention_factor": float(attn),
            "beta_fast": float(s.get("beta_fast") or 32.0), "beta_slow": float(s.get("beta_slow") or 1.0),
            "truncate": bool(s.get("truncate", True))}


def sliding_windows(hf: dict) -> tuple:
    """Per-layer window from `layer_types` (transformers >= 4.5x) or a model-wide `sliding_window`."""
    n, window = hf["num_hidden_layers"], hf.get("sliding_window") or 0
    types = hf.get("layer_types")
    if types:
        return tuple(window if t == "sliding_attention" else 0 for t in types)
    return (0,) * n


def linear(b, x, prefix: str, n_in: int, n_out: int, bias: bool):
    """x @ W.T (+ b) with W = `{prefix}.weight` [n_out, n_in]."""
    w = b.param(f"{prefix}.weight", (n_out, n_in))
    if bias:
        return b.linear(x, w, b.param(f"{prefix}.bias", (n_out,)))
    return b.linear(x, w)


def attention(b, cfg: Config, x, pos, sid, p: str, window: int):
    D, H, Hkv, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = linear(b, x, p + "q_proj", D, H * Dh, cfg.qkv_bias)                 # (T, H*Dh)
    k = linear(b, x, p + "k_proj", D, Hkv * Dh, cfg.qkv_bias)               # (T, Hkv*Dh)
    v = linear(b, x, p + "v_proj", D, Hkv * Dh, cfg.qkv_bias)
    q = b.reshape(q, shape=("T", H, Dh))                                     # (T, H, Dh)
    k = b.reshape(k, shape=("T", Hkv, Dh))
    v = b.reshape(v, shape=("T", Hkv, Dh))
    if cfg.qk_norm:
        q = b.rms_norm(q, b.param(p + "q_norm.weight", (Dh,)), eps=cfg.rms_norm_eps)
        k = b.rms_norm(k, b.param(p + "k_norm.weight", (Dh,)), eps=cfg.rms_norm_eps)
    rope = dict(cfg.rope)
    q, k = b.rope(q, pos, **rope), b.rope(k, pos, **rope)
    o = b.causal_attention(q, k, v, pos, sid, scale=Dh ** -0.5, sliding_window=window)
    o = b.reshape(o, shape=("T", H * Dh))                                    # (T, H*Dh)
    return linear(b, o, p + "o_proj", H * Dh, D, cfg.o_bias)


def mlp(b, cfg: Config, x, p: str):
    D, F = cfg.hidden_size, cfg.intermediate_size
    g = linear(b, x, p + "gate_proj", D, F, cfg.mlp_bias)                   # (T, F)
    u = linear(b, x, p + "up_proj", D, F, cfg.mlp_bias)
    act = b.silu(g) if cfg.hidden_act == "silu" else b.gelu_tanh(g)
    return linear(b, b.mul(act, u), p + "down_proj", F, D, cfg.mlp_bias)    # (T, D)


def decoder(cfg, b, attn, ffn) -> None:
    """The forward entry of a pre-norm decoder: logits[R, V] for rows `logit_rows` of the flattened
    batch. Per layer i (weight prefix p = "model.layers.{i}."), x += attn(h, pos, sid, p, i) and then
    x += ffn(h, p, i), each h the RMSNorm of x; the families with other attention or feed-forward
    blocks (Mixtral, GPT-OSS, DeepSeek-V3) pass their own."""
    D, V, eps = cfg.hidden_size, cfg.vocab_size, cfg.rms_norm_eps
    ids = b.input("input_ids", ("T",), "int32")
    pos = b.input("positions", ("T",), "int32")
    sid = b.input("seq_ids", ("T",), "int32")
    rows = b.input("logit_rows", ("R",), "int32")
    embed = b.param("model.embed_tokens.weight", (V, D))
    x = b.embedding(ids, embed, dtype="float32")                              # (T, D)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = b.rms_norm(x, b.param(p + "input_layernorm.weight", (D,)), eps=eps)
        x = b.add(x, attn(h, pos, sid, p, i))
        h = b.rms_norm(x, b.param(p + "post_attention_layernorm.weight", (D,)), eps=eps)
        x = b.add(x, ffn(h, p, i))                                            # (T, D)
    x = b.take_rows(x, rows)                                                  # (R, D)
    x = b.rms_norm(x, b.param("model.norm.weight", (D,)), eps=eps)
    head = embed if cfg.tie_word_embeddings else b.param("lm_head.weight", (V, D))
    b.output("logits", b.linear(x, head))                                     # (R, V)


def build(cfg: Config, b) -> None:
    decoder(cfg, b, lambda h, pos, sid, p, i: attention(b, cfg, h, pos, sid, p + "self_attn.", cfg.sliding_windows[i]),
            lambda h, p, i: mlp(b, cfg, h, p + "mlp."))
