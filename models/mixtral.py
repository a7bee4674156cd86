"""Mixtral (MixtralForCausalLM): the Llama decoder with a sparse mixture-of-experts MLP, and the
MoE decoder Qwen3-MoE reuses (models/qwen3_moe.py).

Notable (what differs from Llama):
- Each layer's MLP is `num_local_experts` SwiGLU experts of width `intermediate_size`; a router
  (`block_sparse_moe.gate`, a linear to E logits) picks `num_experts_per_tok` of them per token:
  softmax over all experts, the top k, their probabilities renormalised to sum 1 (`moe_router`,
  mode softmax_topk). The token's output is the weighted sum of its experts' outputs.
- Expert dispatch is data: `moe_dispatch` groups the (token, choice) slots by expert, and the
  grouped matmuls (`expert_linear` for gate and up, `expert_linear_sum` for down plus the weighted
  sum) run one matmul per expert over its own tokens, so a decode step reads only the chosen
  experts' weights.
- The checkpoint stores every expert separately (`block_sparse_moe.experts.N.w1/w3/w2.weight`:
  gate, up, down). The definition asks for each as one stacked weight [E, out, in] under the name
  with `*` for N; the frontend stacks the experts (reft/frontends/safetensors.py), GGUF files hold
  the stacks already (`ffn_gate_exps`, ...). fuse_projections joins gate and up per expert, and
  fuse_glu folds the SiLU product in (`expert_glu`), as for a dense MLP.
- `sliding_window`, when set, bounds every layer's attention (as in Mistral).
- GGUF: llama.cpp writes Mixtral as architecture `llama` with `llama.expert_count`
  (GGUF_EXPERTS: this family reads those files, Llama the ones without experts).
"""
from __future__ import annotations

from dataclasses import dataclass

from .llama import Config as LlamaConfig
from .llama import attention, mlp
from .llama import decoder as llama_decoder

ARCHITECTURES = ("MixtralForCausalLM",)

GGUF_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate_inp.weight": "model.layers.{i}.block_sparse_moe.gate.weight",
    "blk.{i}.ffn_gate_exps.weight": "model.layers.{i}.block_sparse_moe.experts.*.w1.weight",
    "blk.{i}.ffn_up_exps.weight": "model.layers.{i}.block_sparse_moe.experts.*.w3.weight",
    "blk.{i}.ffn_down_exps.weight": "model.layers.{i}.block_sparse_moe.experts.*.w2.weight",
}
GGUF_ARCHITECTURES = {"llama": "MixtralForCausalLM"}
GGUF_EXPERTS = True                   # reads the `llama` files that have experts
GGUF_ROPE_PERMUTED = ("self_attn.q_proj", "self_attn.k_proj")

# the sparse MLP's weights under `model.layers.{i}.`: router, then the gate / up / down stacks
MOE_WEIGHTS = ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.*.w1.weight",
               "block_sparse_moe.experts.*.w3.weight", "block_sparse_moe.experts.*.w2.weight")


@dataclass(frozen=True)
class Config(LlamaConfig):
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 0       # each expert's width
    norm_topk_prob: bool = True          # renormalise the chosen experts' probabilities
    moe_layers: tuple = ()               # per layer: True = sparse MLP, False = the dense Llama MLP

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "Config":
        """From a normalised config.json; absent keys take MixtralConfig's defaults."""
        n = hf["num_hidden_layers"]
        kw = dict(num_local_experts=hf.get("num_local_experts", 8), num_experts_per_tok=hf.get("num_experts_per_tok", 2),
                  moe_intermediate_size=hf["intermediate_size"], moe_layers=(True,) * n,
                  sliding_windows=(hf.get("sliding_window") or 0,) * n)
        kw.update(overrides)
        cfg = super().from_hf(hf, **kw)
        if not 0 < cfg.num_experts_per_tok <= cfg.num_local_experts:
            raise ValueError(f"num_experts_per_tok {cfg.num_experts_per_tok} must be in 1..{cfg.num_local_experts}"
                             " (num_local_experts)")
        return cfg


def moe(b, cfg: Config, x, p: str, names=MOE_WEIGHTS):
    """The sparse MLP of one layer on x (T, D): weights `p + name` for the router, gate, up, down."""
    D, E, F, k = cfg.hidden_size, cfg.num_local_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    router, gate, up, down = (p + n for n in names)
    logits = b.linear(x, b.param(router, (E, D)))                                          # (T, E)
    ids, weights = b.moe_router(logits, top_k=k, mode="softmax_topk", normalize=cfg.norm_topk_prob)  # (T, k) x2
    order, offsets = b.moe_dispatch(ids, experts=E)                                       # (T, k), (E + 1,)
    g = b.expert_linear(x, order, offsets, b.param(gate, (E, F, D)))                      # (T, k, F)
    u = b.expert_linear(x, order, offsets, b.param(up, (E, F, D)))                        # (T, k, F)
    act = b.silu(g) if cfg.hidden_act == "silu" else b.gelu_tanh(g)
    return b.expert_linear_sum(b.mul(act, u), order, offsets, weights, b.param(down, (E, D, F)))   # (T, D)


def decoder(cfg: Config, b, names=MOE_WEIGHTS) -> None:
    """The forward entry (llama.decoder) with a sparse MoE block in the layers cfg.moe_layers marks."""
    def attn(h, pos, sid, p, i):
        return attention(b, cfg, h, pos, sid, p + "self_attn.", cfg.sliding_windows[i])

    def ffn(h, p, i):
        return moe(b, cfg, h, p, names) if cfg.moe_layers[i] else mlp(b, cfg, h, p + "mlp.")

    llama_decoder(cfg, b, attn, ffn)


def build(cfg: Config, b) -> None:
    decoder(cfg, b)
