"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3's attention (per-head q/k RMSNorm) with Mixtral's sparse
MLP (models/mixtral.py), under Qwen's weight names.

Notable:
- Experts are `moe_intermediate_size` wide; the router (`mlp.gate`) keeps the top
  `num_experts_per_tok` of the softmax and renormalises them only with `norm_topk_prob`.
- `sliding_window` bounds every layer's attention, only with `use_sliding_window`.
- Some layers may be dense, as transformers builds them: those in `mlp_only_layers`, and all but
  every `decoder_sparse_step`-th; they run the Llama MLP of width `intermediate_size`.
- The expert count is `num_experts` in Hub configs (`num_local_experts` where transformers 5
  wrote the file).
- GGUF (`qwen3moe`): llama.cpp's graph always renormalises the chosen experts' weights and has
  no dense layers; `gguf_config` says so.
"""
from __future__ import annotations

from dataclasses import dataclass

from .mixtral import Config as MixtralConfig
from .mixtral import decoder

ARCHITECTURES = ("Qwen3MoeForCausalLM",)

GGUF_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate_inp.weight": "model.layers.{i}.mlp.gate.weight",
    "blk.{i}.ffn_gate_exps.weight": "model.layers.{i}.mlp.experts.*.gate_proj.weight",
    "blk.{i}.ffn_up_exps.weight": "model.layers.{i}.mlp.experts.*.up_proj.weight",
    "blk.{i}.ffn_down_exps.weight": "model.layers.{i}.mlp.experts.*.down_proj.weight",
}
GGUF_ARCHITECTURES = {"qwen3moe": "Qwen3MoeForCausalLM"}
GGUF_EXPERTS = True
GGUF_ROPE_PERMUTED = ()

MOE_WEIGHTS = ("mlp.gate.weight", "mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight",
               "mlp.experts.*.down_proj.weight")


@dataclass(frozen=True)
class Config(MixtralConfig):
    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "Config":
        """From a normalised config.json; absent keys take Qwen3MoeConfig's defaults."""
        n, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step") or 1
        dense = set(hf.get("mlp_only_layers") or ())
        experts = hf.get("num_experts") or hf.get("num_local_experts") or 128
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else 0
        kw = dict(qk_norm=True, sliding_windows=(window or 0,) * n,
                  num_local_experts=experts, num_experts_per_tok=hf.get("num_experts_per_tok", 8),
                  moe_intermediate_size=hf.get("moe_intermediate_size", 768),
                  norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                  moe_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(n)))
        kw.update(overrides)
        return super().from_hf(hf, **kw)


def gguf_config(cfg: dict) -> dict:
    """llama.cpp's qwen3moe graph renormalises the chosen experts' weights (no key says so)."""
    return {**cfg, "norm_topk_prob": True}


def build(cfg: Config, b) -> None:
    decoder(cfg, b, MOE_WEIGHTS)
