"""Phi-3 (Phi3ForCausalLM): the Llama decoder with fused checkpoint projections and LongRoPE.

Notable:
- The checkpoint stores q/k/v as one `self_attn.qkv_proj.weight` [(H + 2*Hkv)*Dh, D] and
  gate/up as one `mlp.gate_up_proj.weight` [2F, D]. The names stay verbatim and the projection's
  output is cut with `split` in transformers' order (q, k, v; gate before up): after
  fuse_projections a Llama graph has exactly this shape, so the later fusions (qkv_rope, the
  gated-activation epilogue) apply alike.
- Rotary may cover only the first `partial_rotary_factor * head_dim` dims of each head.
- `longrope` (also written `su`) scaling, as transformers computes it: frequencies
  1 / (factor_i * theta^(2i/d)) with the short factors, or the long ones once a sequence reaches
  past `original_max_position_embeddings` positions in the forward call (transformers compares
  max(position_ids) + 1 of the call; here each token's `seq_extent`: its own sequence's, so a
  sequence's logits do not depend on its batch), cos and sin scaled by the attention factor
  (given, or sqrt(1 + ln(factor) / ln(original)) with factor = max / original positions).
- `sliding_window`, when set, bounds every layer's attention to the last W positions.
- No imports: the file is also a valid `--model-def` (docs/adding-a-model.md walks through it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

ARCHITECTURES = ("Phi3ForCausalLM",)

GGUF_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_qkv.weight": "model.layers.{i}.self_attn.qkv_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.gate_up_proj.weight",       # gate and up, as in the checkpoint
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
GGUF_ARCHITECTURES = {"phi3": "Phi3ForCausalLM"}
GGUF_ROPE_PERMUTED = ()

ROPE_TYPES = ("default", "longrope", "su", "yarn")      # Phi3Config reads `su` and `yarn` as longrope


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
    rope: tuple                      # the rope op's attrs, (("theta", ..), ("rotary_dim", ..), ...)
    sliding_window: int = 0          # 0 = full attention

    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        """From a normalised config.json; absent keys take Phi3Config's defaults."""
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Phi3ForCausalLM: hidden_act {hf['hidden_act']!r} is not supported (supported: silu)")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope=phi3_rope(hf, head_dim), sliding_window=hf.get("sliding_window") or 0,
        )


def phi3_rope(hf: dict, head_dim: int) -> tuple:
    """The rope op's attrs: default, or longrope with transformers' defaults (Phi3Config's
    top-level original_max_position_embeddings, 4096 when absent, wins over the rope parameters')."""
    s = hf.get("rope_scaling") or {"rope_type": "default"}
    kind = s.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ValueError(f"Phi3ForCausalLM: rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    a = {"theta": float(hf.get("rope_theta", 10000.0)), "scaling": "default",
         "rotary_dim": int(head_dim * (hf.get("partial_rotary_factor") or 1.0))}
    if kind == "default":
        return tuple(sorted(a.items()))
    half = a["rotary_dim"] // 2
    short, long = s.get("short_factor"), s.get("long_factor")
    if not (isinstance(short, list) and isinstance(long, list) and len(short) == len(long) == half):
        raise ValueError(f"Phi3ForCausalLM: longrope needs short_factor and long_factor lists of {half} numbers")
    orig = int(hf.get("original_max_position_embeddings", 4096))
    factor = s.get("factor") or hf.get("max_position_embeddings", 4096) / orig
    attn = s.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    a.update(scaling="longrope", short_factor=tuple(float(x) for x in short), long_factor=tuple(float(x) for x in long),
             original_max_position=orig, attention_factor=float(attn))
    return tuple(sorted(a.items()))


def attention(b, cfg: Config, x, pos, ext, sid, p: str):
    D, H, Hkv, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv = b.linear(x, b.param(p + "qkv_proj.weight", ((H + 2 * Hkv) * Dh, D)))  # (T, (H+2*Hkv)*Dh)
    q, k, v = b.split(qkv, axis=-1, sizes=(H * Dh, Hkv * Dh, Hkv * Dh))       # (T, H*Dh), (T, Hkv*Dh) x2
    q = b.reshape(q, shape=("T", H, Dh))                                        # (T, H, Dh)
    k = b.reshape(k, shape=("T", Hkv, Dh))                                      # (T, Hkv, Dh)
    v = b.reshape(v, shape=("T", Hkv, Dh))
    rope = dict(cfg.rope)
    q, k = b.rope(q, pos, *ext, **rope), b.rope(k, pos, *ext, **rope)
    o = b.causal_attention(q, k, v, pos, sid, scale=Dh ** -0.5, sliding_window=cfg.sliding_window)  # (T, H, Dh)
    o = b.reshape(o, shape=("T", H * Dh))                                       # (T, H*Dh)
    return b.linear(o, b.param(p + "o_proj.weight", (D, H * Dh)))              # (T, D)


def mlp(b, cfg: Config, x, p: str):
    D, F = cfg.hidden_size, cfg.intermediate_size
    gate_up = b.linear(x, b.param(p + "gate_up_proj.weight", (2 * F, D)))      # (T, 2F)
    gate, up = b.split(gate_up, axis=-1, sizes=(F, F))                          # (T, F) x2
    return b.linear(b.mul(b.silu(gate), up), b.param(p + "down_proj.weight", (D, F)))   # (T, D)


def build(cfg: Config, b) -> None:
    """The forward entry: logits[R, V] for rows `logit_rows` of the flattened token batch."""
    D, V, eps = cfg.hidden_size, cfg.vocab_size, cfg.rms_norm_eps
    ids = b.input("input_ids", ("T",), "int32")
    pos = b.input("positions", ("T",), "int32")
    sid = b.input("seq_ids", ("T",), "int32")
    rows = b.input("logit_rows", ("R",), "int32")
    # longrope picks its factors by how far each token's sequence reaches in this batch
    ext = [b.seq_extent(pos, sid)] if dict(cfg.rope)["scaling"] == "longrope" else []   # (T,)
    embed = b.param("model.embed_tokens.weight", (V, D))
    x = b.embedding(ids, embed, dtype="float32")                                # (T, D)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = b.rms_norm(x, b.param(p + "input_layernorm.weight", (D,)), eps=eps)
        x = b.add(x, attention(b, cfg, h, pos, ext, sid, p + "self_attn."))    # (T, D)
        h = b.rms_norm(x, b.param(p + "post_attention_layernorm.weight", (D,)), eps=eps)
        x = b.add(x, mlp(b, cfg, h, p + "mlp."))
    x = b.take_rows(x, rows)                                                    # (R, D)
    x = b.rms_norm(x, b.param("model.norm.weight", (D,)), eps=eps)
    head = embed if cfg.tie_word_embeddings else b.param("lm_head.weight", (V, D))
    b.output("logits", b.linear(x, head))                                       # (R, V)
