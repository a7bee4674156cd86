"""Gemma 3, text only (Gemma3ForCausalLM, model_type gemma3_text): the Gemma 2 decoder
(models/gemma2.py) with per-head q/k RMSNorm and a rope of its own per layer type.

Notable:
- q_norm / k_norm ([head_dim], scaling by 1 + w like every Gemma norm) before rotary.
- Sliding and global layers from `layer_types` (older configs: every `sliding_window_pattern`-th
  layer, default 6, is global). Sliding layers rotate with their own base (`rope_local_base_freq`,
  or the `sliding_attention` rope parameters) and no scaling; global ones with `rope_theta` and the
  config's rope scaling (e.g. linear, factor 8).
- No attention soft-capping: transformers does not apply `attn_logit_softcapping` in Gemma 3.
  Final-logit soft-capping applies when `final_logit_softcapping` is set.
"""
from __future__ import annotations

from .gemma2 import GGUF_ROPE_PERMUTED, build, gguf_config  # noqa: F401  (same graph as Gemma 2)
from .gemma2 import GGUF_TENSORS as GEMMA2_GGUF_TENSORS
from .gemma2 import Config as Gemma2Config
from .gemma2 import common, head_dim, layer_types, sliding_windows
from .llama import rope_attrs

ARCHITECTURES = ("Gemma3ForCausalLM",)
GGUF_ARCHITECTURES = {"gemma3": "Gemma3ForCausalLM"}
GGUF_TENSORS = {**GEMMA2_GGUF_TENSORS, "output.weight": "lm_head.weight",
                "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
                "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight"}


class Config(Gemma2Config):
    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "Config":
        """From a normalised config.json; absent keys take Gemma3TextConfig's defaults."""
        dh, types = head_dim(hf), layer_types(hf, hf.get("sliding_window_pattern", 6))
        by_type = hf.get("rope_scaling_by_layer_type")
        if by_type:      # transformers 5: rope_parameters per layer type
            full, local = (rope_attrs(hf, dh, theta=by_type[t]["rope_theta"], scaling=by_type[t])
                           for t in ("full_attention", "sliding_attention"))
        else:            # rope_theta + rope_scaling for global layers, rope_local_base_freq for sliding ones
            full = rope_attrs(hf, dh)
            local = rope_attrs(hf, dh, theta=hf.get("rope_local_base_freq", 10000.0), scaling={"rope_type": "default"})
        return cls(**{**common(hf, "Gemma3ForCausalLM"),
                      "max_position_embeddings": hf.get("max_position_embeddings", 131072),
                      "ropes": tuple(local if t == "sliding_attention" else full for t in types),
                      "sliding_windows": sliding_windows(hf, types),
                      "final_softcap": float(hf.get("final_logit_softcapping") or 0.0), "qk_norm": True, **overrides})
