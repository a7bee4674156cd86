"""Phi-3 (Phi3ForCausalLM): a model definition reft does not ship, compiled with
`reftc compile MODEL_DIR -o PLAN --model-def docs/examples/phi3.py` (see docs/adding-a-model.md).

Notable:
- The checkpoint stores q/k/v as one `self_attn.qkv_proj.weight` [(H + 2*Hkv)*Dh, D] and
  gate/up as one `mlp.gate_up_proj.weight` [2F, D]. We keep those names verbatim and cut the
  projection's output with `split`, in transformers' order (q, k, v; gate before up).
- Rotary may cover only the first `partial_rotary_factor * head_dim` dims of each head.
- `sliding_window`, when set, bounds every layer's attention to the last W positions.
- Only the default rope; the "longrope" of the 128k-context checkpoints raises ValueError.
- No imports from reft: `build` receives a GraphBuilder and every registered op is a method.
"""
from __future__ import annotations

from dataclasses import dataclass

ARCHITECTURES = ("Phi3ForCausalLM",)


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
    rope_theta: float
    rotary_dim: int                  # leading dims of each head that rotary touches
    sliding_window: int = 0          # 0 = full attention

    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        """From config.json as reft.frontends.config normalises it: `rope_theta`,
        `rope_scaling` = {"rope_type": ..., ...} and a top-level `partial_rotary_factor`."""
        rope_type = (hf.get("rope_scaling") or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"Phi3ForCausalLM: rope type {rope_type!r} is not supported (supported: default)")
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
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rotary_dim=int(head_dim * hf.get("partial_rotary_factor", 1.0)),
            sliding_window=hf.get("sliding_window") or 0,
        )


def attention(b, cfg: Config, x, pos, sid, p: str):
    D, H, Hkv, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv = b.linear(x, b.param(p + "qkv_proj.weight", ((H + 2 * Hkv) * Dh, D)))  # (T, (H+2*Hkv)*Dh)
    q, k, v = b.split(qkv, axis=-1, sizes=(H * Dh, Hkv * Dh, Hkv * Dh))       # (T, H*Dh), (T, Hkv*Dh) x2
    q = b.reshape(q, shape=("T", H, Dh))                                        # (T, H, Dh)
    k = b.reshape(k, shape=("T", Hkv, Dh))                                      # (T, Hkv, Dh)
    v = b.reshape(v, shape=("T", Hkv, Dh))
    q = b.rope(q, pos, theta=cfg.rope_theta, rotary_dim=cfg.rotary_dim)
    k = b.rope(k, pos, theta=cfg.rope_theta, rotary_dim=cfg.rotary_dim)
    # Written over the batch's own rows; the paged-KV pass turns it into cache writes + reads.
    o = b.causal_attention(q, k, v, pos, sid, scale=Dh ** -0.5,
                           sliding_window=cfg.sliding_window)                   # (T, H, Dh)
    o = b.reshape(o, shape=("T", H * Dh))                                       # (T, H*Dh)
    return b.linear(o, b.param(p + "o_proj.weight", (D, H * Dh)))              # (T, D)


def mlp(b, cfg: Config, x, p: str):
    D, F = cfg.hidden_size, cfg.intermediate_size
    gate_up = b.linear(x, b.param(p + "gate_up_proj.weight", (2 * F, D)))      # (T, 2F)
    gate, up = b.split(gate_up, axis=-1, sizes=(F, F))                          # (T, F) x2
    h = b.mul(up, b.silu(gate))                                                 # (T, F)
    return b.linear(h, b.param(p + "down_proj.weight", (D, F)))                # (T, D)


def build(cfg: Config, b) -> None:
    """The forward entry: logits[R, V] for rows `logit_rows` of the flattened token batch."""
    D, V, eps = cfg.hidden_size, cfg.vocab_size, cfg.rms_norm_eps
    ids = b.input("input_ids", ("T",), "int32")       # tokens of every sequence in the batch
    pos = b.input("positions", ("T",), "int32")       # position of each token in its sequence
    sid = b.input("seq_ids", ("T",), "int32")         # which sequence each token belongs to
    rows = b.input("logit_rows", ("R",), "int32")     # rows whose logits the caller wants
    embed = b.param("model.embed_tokens.weight", (V, D))
    x = b.embedding(ids, embed, dtype="float32")                                # (T, D)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = b.rms_norm(x, b.param(p + "input_layernorm.weight", (D,)), eps=eps)
        x = b.add(x, attention(b, cfg, h, pos, sid, p + "self_attn."))         # (T, D)
        h = b.rms_norm(x, b.param(p + "post_attention_layernorm.weight", (D,)), eps=eps)
        x = b.add(x, mlp(b, cfg, h, p + "mlp."))
    x = b.take_rows(x, rows)                                                    # (R, D)
    x = b.rms_norm(x, b.param("model.norm.weight", (D,)), eps=eps)
    head = embed if cfg.tie_word_embeddings else b.param("lm_head.weight", (V, D))
    b.output("logits", b.linear(x, head))                                       # (R, V)
