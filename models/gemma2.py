"""Gemma 2 (Gemma2ForCausalLM), and the decoder Gemma 3 reuses (models/gemma3.py).

Notable (what differs from Llama):
- RMSNorm scales by (1 + w): checkpoints store the scale's offset from 1, so every norm is
  `rms_norm(..., offset=1.0)` and the weights stay verbatim (the +1 is added in float32 as
  transformers does, also in bfloat16 plans; trainable as stored). llama.cpp's converter writes
  1 + w into GGUF files, which therefore get offset 0 (`gguf_config`).
- Four norms per layer: input_layernorm before attention, post_attention_layernorm on the
  attention output before its residual add, pre_feedforward_layernorm before the MLP,
  post_feedforward_layernorm on the MLP output.
- Embeddings are multiplied by sqrt(hidden_size), a float32 constant (transformers rounds it to
  the model dtype; float32 here). A tied LM head reads the unscaled table.
- GeGLU MLP: gelu_tanh(gate) * up.
- Attention scale query_pre_attn_scalar ** -0.5. Scores are soft-capped, c * tanh(s / c), before
  the mask (attn_logit_softcapping), and so are the final logits (final_logit_softcapping).
- Sliding-window attention on alternate layers (`layer_types`; layer 0 slides).
"""
from __future__ import annotations

from dataclasses import dataclass

from .llama import linear, rope_attrs

ARCHITECTURES = ("Gemma2ForCausalLM",)

# llama.cpp's GGUF names -> weight names ({i}: layer); Gemma 2 files always tie the LM head
GGUF_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
GGUF_ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM"}
GGUF_ROPE_PERMUTED = ()           # llama.cpp runs Gemma's rotary in the rotate-half layout

ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
BIG_27B_LAYERS = {"gemma2": 46, "gemma3": 62}    # llama.cpp's test for the 27B models (gguf_config)


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
    ropes: tuple                  # per layer: the rope op's attrs, (("theta", ..), ("rotary_dim", ..), ...)
    sliding_windows: tuple        # per layer: 0 = full attention
    attn_scale: float             # query_pre_attn_scalar ** -0.5
    attn_softcap: float = 0.0     # 0 = no soft-capping
    final_softcap: float = 0.0
    attention_bias: bool = False
    qk_norm: bool = False         # Gemma 3
    norm_offset: float = 1.0      # RMSNorm scales by norm_offset + w

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "Config":
        """From a normalised config.json; absent keys take Gemma2Config's defaults."""
        return cls(**{**common(hf, "Gemma2ForCausalLM"),
                      "ropes": (rope_attrs(hf, head_dim(hf)),) * hf["num_hidden_layers"],
                      "sliding_windows": sliding_windows(hf, layer_types(hf, hf.get("sliding_window_pattern", 2))),
                      "attn_softcap": float(hf.get("attn_logit_softcapping", 50.0) or 0.0),
                      "final_softcap": float(hf.get("final_logit_softcapping", 30.0) or 0.0), **overrides})


def head_dim(hf: dict) -> int:
    return hf.get("head_dim") or 256


def common(hf: dict, arch: str) -> dict:
    """The fields Gemma 2 and 3 read alike (their configs share names and defaults)."""
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"{arch}: use_bidirectional_attention is not supported (causal attention only)")
    act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
    if act not in ACTIVATIONS:
        raise ValueError(f"{arch}: hidden_activation {act!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    heads = hf["num_attention_heads"]
    return dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
                head_dim=head_dim(hf), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=hf.get("max_position_embeddings", 8192),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
                attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
                attention_bias=bool(hf.get("attention_bias", False)),
                norm_offset=float(hf.get("rms_norm_offset", 1.0)))   # reft's key: 0 from GGUF files (gguf_config)


def layer_types(hf: dict, pattern: int) -> list:
    """`layer_types`, or (older configs) every `pattern`-th layer global, the others sliding."""
    n = hf["num_hidden_layers"]
    return hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


def sliding_windows(hf: dict, types: list) -> tuple:
    """Per-layer window (0 = full attention)."""
    window = hf.get("sliding_window", 4096) or 0
    return tuple(window if t == "sliding_attention" else 0 for t in types)


def gguf_config(cfg: dict) -> dict:
    """What llama.cpp's Gemma loaders assume rather than read from the file: norm weights already
    hold 1 + w (the converter added it); the attention scale is head_dim ** -0.5, except for the
    27B models (hidden_size / heads); a Gemma 3 file without a window has no sliding layers (a
    Gemma 2 one slides over 4096, as the config's default)."""
    arch, n = cfg["model_type"], cfg["num_hidden_layers"]
    out = {**cfg, "rms_norm_offset": 0.0,
           "query_pre_attn_scalar": cfg["hidden_size"] // cfg["num_attention_heads"] if n == BIG_27B_LAYERS[arch]
           else cfg["head_dim"]}
    if "sliding_window" not in cfg and arch == "gemma3":   # no window in the file: no sliding layers
        out["layer_types"] = ["full_attention"] * n
    return out


def norm(b, cfg: Config, x, name: str):
    return b.rms_norm(x, b.param(name + ".weight", (x.shape[-1],)), eps=cfg.rms_norm_eps,
                      **({"offset": cfg.norm_offset} if cfg.norm_offset else {}))


def attention(b, cfg: Config, x, pos, sid, p: str, i: int):
    D, H, Hkv, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = linear(b, x, p + "q_proj", D, H * Dh, cfg.attention_bias)                   # (T, H*Dh)
    k = linear(b, x, p + "k_proj", D, Hkv * Dh, cfg.attention_bias)                 # (T, Hkv*Dh)
    v = linear(b, x, p + "v_proj", D, Hkv * Dh, cfg.attention_bias)
    q = b.reshape(q, shape=("T", H, Dh))                                             # (T, H, Dh)
    k = b.reshape(k, shape=("T", Hkv, Dh))
    v = b.reshape(v, shape=("T", Hkv, Dh))
    if cfg.qk_norm:
        q, k = norm(b, cfg, q, p + "q_norm"), norm(b, cfg, k, p + "k_norm")
    rope = dict(cfg.ropes[i])
    q, k = b.rope(q, pos, **rope), b.rope(k, pos, **rope)
    o = b.causal_attention(q, k, v, pos, sid, scale=cfg.attn_scale, sliding_window=cfg.sliding_windows[i],
                           **({"softcap": cfg.attn_softcap} if cfg.attn_softcap else {}))   # (T, H, Dh)
    o = b.reshape(o, shape=("T", H * Dh))                                            # (T, H*Dh)
    return linear(b, o, p + "o_proj", H * Dh, D, cfg.attention_bias)                 # (T, D)


def mlp(b, cfg: Config, x, p: str):
    D, F = cfg.hidden_size, cfg.intermediate_size
    g = linear(b, x, p + "gate_proj", D, F, False)                                  # (T, F)
    u = linear(b, x, p + "up_proj", D, F, False)
    return linear(b, b.mul(b.gelu_tanh(g), u), p + "down_proj", F, D, False)         # (T, D)


def build(cfg: Config, b) -> None:
    """The forward entry: logits[R, V] for rows `logit_rows` of the flattened batch."""
    D, V = cfg.hidden_size, cfg.vocab_size
    ids = b.input("input_ids", ("T",), "int32")
    pos = b.input("positions", ("T",), "int32")
    sid = b.input("seq_ids", ("T",), "int32")
    rows = b.input("logit_rows", ("R",), "int32")
    embed = b.param("model.embed_tokens.weight", (V, D))
    x = b.scale(b.embedding(ids, embed, dtype="float32"), factor=D ** 0.5)            # (T, D)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = attention(b, cfg, norm(b, cfg, x, p + "input_layernorm"), pos, sid, p + "self_attn.", i)
        x = b.add(x, norm(b, cfg, h, p + "post_attention_layernorm"))
        h = mlp(b, cfg, norm(b, cfg, x, p + "pre_feedforward_layernorm"), p + "mlp.")
        x = b.add(x, norm(b, cfg, h, p + "post_feedforward_layernorm"))
    x = b.take_rows(x, rows)                                                           # (R, D)
    x = norm(b, cfg, x, "model.norm")
    head = embed if cfg.tie_word_embeddings else b.param("lm_head.weight", (V, D))
    logits = b.linear(x, head)                                                         # (R, V)
    if cfg.final_softcap:
        logits = b.softcap(logits, cap=cfg.final_softcap)
    b.output("logits", logits)
