"""GPT-OSS (GptOssForCausalLM): a mixture-of-experts decoder with attention sinks, alternating
sliding-window and full attention, and YaRN rope scaling.

Notable (what differs from Llama / Mixtral):
- Attention: q/k/v/o projections with biases; a learned logit per query head (`self_attn.sinks`)
  joins every query's softmax denominator (the optional last input of `causal_attention`);
  `layer_types` alternates sliding (window `sliding_window`) and full layers, sliding first.
- Rope: YaRN (rope_type "yarn": factor, beta_fast / beta_slow, original context, `truncate` false
  in the released configs), cos and sin scaled by 0.1 ln(factor) + 1 (models/llama.rope_attrs).
- Router (`mlp.router`, a linear with a bias): the top `num_experts_per_tok` logits, softmax over
  those only (moe_router mode topk_softmax).
- Experts with biases and a clamped SwiGLU: (clamp(up, ±limit) + 1) * g sigmoid(alpha g) with
  g = min(gate, limit) (`swiglu_oai`; fuse_glu folds it into expert_glu like SiLU(gate) * up).
- Checkpoint layout: the experts multiply x @ W, so `mlp.experts.gate_up_proj` is [E, D, 2F] with gate
  and up interleaved by column (gate = columns 0, 2, 4, ...) and `down_proj` [E, F, D]; biases
  `gate_up_proj_bias` [E, 2F] (interleaved too) and `down_proj_bias` [E, D]. The definition reads
  them verbatim and writes the reordering as view ops on the weights (reshape, transpose), which
  fold_weight_views folds into reft's [E, N, K] stacks at compile time.
- GGUF (`gpt-oss`): llama.cpp's converter already split and transposed the experts
  (ffn_gate_exps / ffn_up_exps [E, F, D], ffn_down_exps [E, D, F], each with a `.bias`); gguf_config
  marks the config `split_experts`, and the definition then reads those stacks (gate and up
  fuse back through fuse_projections). Its graph assumes alpha 1.702 and limit 7 and the released
  rope (no truncation); the sliding layers alternate as in transformers.
"""
from __future__ import annotations

from dataclasses import dataclass

from .llama import decoder, linear, rope_attrs

ARCHITECTURES = ("GptOssForCausalLM",)

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
    "blk.{i}.attn_sinks.weight": "model.layers.{i}.self_attn.sinks",
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate_inp.weight": "model.layers.{i}.mlp.router.weight",
    "blk.{i}.ffn_gate_inp.bias": "model.layers.{i}.mlp.router.bias",
    # the converter's names for the split, transposed experts ([E, out, in], biases [E, out])
    "blk.{i}.ffn_gate_exps.weight": "model.layers.{i}.mlp.experts.gate_proj.weight",
    "blk.{i}.ffn_up_exps.weight": "model.layers.{i}.mlp.experts.up_proj.weight",
    "blk.{i}.ffn_down_exps.weight": "model.layers.{i}.mlp.experts.down_proj.weight",
    "blk.{i}.ffn_gate_exps.bias": "model.layers.{i}.mlp.experts.gate_proj.bias",
    "blk.{i}.ffn_up_exps.bias": "model.layers.{i}.mlp.experts.up_proj.bias",
    "blk.{i}.ffn_down_exps.bias": "model.layers.{i}.mlp.experts.down_proj.bias",
}
GGUF_ARCHITECTURES = {"gpt-oss": "GptOssForCausalLM"}
GGUF_EXPERTS = True
GGUF_ROPE_PERMUTED = ()
GGUF_SWIGLU = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}     # what llama.cpp's gpt-oss graph applies


@dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int               # each expert's width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: tuple                          # the rope op's attrs (YaRN in the released configs)
    sliding_windows: tuple               # per layer: 0 = full attention
    num_local_experts: int
    num_experts_per_tok: int
    swiglu_alpha: float
    swiglu_limit: float
    attention_bias: bool = True
    split_experts: bool = False          # GGUF: gate / up / down stacks as llama.cpp's converter wrote them

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "Config":
        """From a normalised config.json; absent keys take GptOssConfig's defaults."""
        n, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        window = hf.get("sliding_window") or 0
        types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        if len(types) != n:
            raise ValueError(f"layer_types has {len(types)} entries for {n} layers")
        kw = dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                  num_hidden_layers=n, num_attention_heads=heads,
                  num_key_value_heads=hf.get("num_key_value_heads") or heads,
                  head_dim=head_dim, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                  max_position_embeddings=hf.get("max_position_embeddings", 131072),
                  tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), rope=rope_attrs(hf, head_dim),
                  sliding_windows=tuple(window if t == "sliding_attention" else 0 for t in types),
                  num_local_experts=hf.get("num_local_experts") or hf.get("num_experts") or 128,
                  num_experts_per_tok=hf.get("num_experts_per_tok", 4),
                  swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)), swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
                  attention_bias=bool(hf.get("attention_bias", True)), split_experts=bool(hf.get("split_experts")))
        kw.update(overrides)
        cfg = cls(**kw)
        if not 0 < cfg.num_experts_per_tok <= cfg.num_local_experts:
            raise ValueError(f"num_experts_per_tok {cfg.num_experts_per_tok} must be in 1..{cfg.num_local_experts}"
                             " (num_local_experts)")
        return cfg


def gguf_config(cfg: dict) -> dict:
    """What llama.cpp's gpt-oss loader assumes rather than reads: the expert width is
    expert_feed_forward_length, the split expert stacks, alternating sliding layers (sliding first),
    the SwiGLU constants, and GPT-OSS's own YaRN (no truncation; beta_fast / beta_slow from the file
    or 32 / 1)."""
    out = {**cfg, **GGUF_SWIGLU, "split_experts": True}
    out["intermediate_size"] = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    n = cfg["num_hidden_layers"]
    if "layer_types" not in cfg and cfg.get("sliding_window"):
        out["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    scaling = cfg.get("rope_scaling")
    if scaling and scaling.get("rope_type") == "yarn":
        out["rope_scaling"] = {**scaling, "truncate": False,
                               "original_max_position_embeddings": cfg.get("original_max_position_embeddings"),
                               "beta_fast": cfg.get("yarn_beta_fast") or 32.0,
                               "beta_slow": cfg.get("yarn_beta_slow") or 1.0}
    return out


def attention(b, cfg: Config, x, pos, sid, p: str, window: int):
    """Biased q/k/v/o projections, YaRN rope, sinks; x (T, D) -> (T, D)."""
    D, H, Hkv, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    bias = cfg.attention_bias
    q = b.reshape(linear(b, x, p + "q_proj", D, H * Dh, bias), shape=("T", H, Dh))         # (T, H, Dh)
    k = b.reshape(linear(b, x, p + "k_proj", D, Hkv * Dh, bias), shape=("T", Hkv, Dh))     # (T, Hkv, Dh)
    v = b.reshape(linear(b, x, p + "v_proj", D, Hkv * Dh, bias), shape=("T", Hkv, Dh))
    rope = dict(cfg.rope)
    q, k = b.rope(q, pos, **rope), b.rope(k, pos, **rope)
    sinks = b.param(p + "sinks", (H,))
    o = b.causal_attention(q, k, v, pos, sid, sinks, scale=Dh ** -0.5, sliding_window=window)   # (T, H, Dh)
    return linear(b, b.reshape(o, shape=("T", H * Dh)), p + "o_proj", H * Dh, D, bias)       # (T, D)


def expert_weights(b, cfg: Config, p: str) -> tuple:
    """(gate/up stack [E, 2F, D] with gate rows first, its bias [E, 2F], down stack [E, D, F], its
    bias [E, D]) from the checkpoint's x @ W tensors, reordered by view ops (fold_weight_views)."""
    D, E, F = cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size
    gu = b.reshape(b.param(p + "gate_up_proj", (E, D, 2 * F)), shape=(E, D, F, 2))        # column 2f + j: (f, j)
    gu = b.reshape(b.transpose(gu, perm=(0, 3, 2, 1)), shape=(E, 2 * F, D))               # (E, [gate; up], D)
    gub = b.reshape(b.param(p + "gate_up_proj_bias", (E, 2 * F)), shape=(E, F, 2))
    gub = b.reshape(b.transpose(gub, perm=(0, 2, 1)), shape=(E, 2 * F))                   # (E, [gate; up])
    down = b.transpose(b.param(p + "down_proj", (E, F, D)), perm=(0, 2, 1))               # (E, D, F)
    return gu, gub, down, b.param(p + "down_proj_bias", (E, D))


def moe(b, cfg: Config, x, p: str):
    """The sparse MLP of one layer on x (T, D), weights under `p` = `model.layers.{i}.mlp.`."""
    D, E, F, k = cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size, cfg.num_experts_per_tok
    logits = linear(b, x, p + "router", D, E, True)                                         # (T, E)
    ids, weights = b.moe_router(logits, top_k=k, mode="topk_softmax")                      # (T, k) x2
    order, offsets = b.moe_dispatch(ids, experts=E)                                        # (T, k), (E + 1,)
    e = p + "experts."
    if cfg.split_experts:
        g = b.expert_linear(x, order, offsets, b.param(e + "gate_proj.weight", (E, F, D)),
                            b.param(e + "gate_proj.bias", (E, F)))                          # (T, k, F)
        u = b.expert_linear(x, order, offsets, b.param(e + "up_proj.weight", (E, F, D)),
                            b.param(e + "up_proj.bias", (E, F)))
        down, down_b = b.param(e + "down_proj.weight", (E, D, F)), b.param(e + "down_proj.bias", (E, D))
    else:
        gu, gub, down, down_b = expert_weights(b, cfg, e)
        g, u = b.split(b.expert_linear(x, order, offsets, gu, gub), axis=-1, sizes=(F, F))  # (T, k, F) x2
    h = b.swiglu_oai(g, u, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)                # (T, k, F)
    return b.expert_linear_sum(h, order, offsets, weights, down, down_b)                   # (T, D)


def build(cfg: Config, b) -> None:
    """The forward entry (llama.decoder) with GPT-OSS's attention (sinks, windows) and MoE block."""
    decoder(cfg, b, lambda h, pos, sid, p, i: attention(b, cfg, h, pos, sid, p + "self_attn.", cfg.sliding_windows[i]),
            lambda h, p, i: moe(b, cfg, h, p + "mlp."))
