"""Qwen3 (Qwen3ForCausalLM): the Llama decoder with per-head RMSNorm on q and k before rotary.

Notable: `q_norm`/`k_norm` weights are [head_dim]; head_dim is explicit in the config and
usually differs from hidden_size / num_attention_heads.
"""
from __future__ import annotations

from .llama import Config as LlamaConfig
from .llama import GGUF_TENSORS, build, sliding_windows  # noqa: F401  (same graph as Llama)

ARCHITECTURES = ("Qwen3ForCausalLM",)
# GGUF files: same tensor names as Llama; llama.cpp keeps this family's q/k rows as they are
GGUF_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM"}
GGUF_ROPE_PERMUTED = ()


class Config(LlamaConfig):
    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "Config":
        windows = sliding_windows(hf) if hf.get("use_sliding_window") else (0,) * hf["num_hidden_layers"]
        return super().from_hf(hf, qk_norm=True, sliding_windows=windows, **overrides)
