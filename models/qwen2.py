"""Qwen2 (Qwen2ForCausalLM): the Llama decoder with biases on the q/k/v projections.

Notable: q/k/v carry a bias, o_proj does not; sliding-window layers come from `layer_types`
(only when `use_sliding_window` is on).
"""
from __future__ import annotations

from .llama import Config as LlamaConfig
from .llama import GGUF_TENSORS, build, sliding_windows  # noqa: F401  (same graph as Llama)

ARCHITECTURES = ("Qwen2ForCausalLM",)
# GGUF files: same tensor names as Llama; llama.cpp keeps this family's q/k rows as they are
GGUF_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM"}
GGUF_ROPE_PERMUTED = ()


class Config(LlamaConfig):
    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "Config":
        windows = sliding_windows(hf) if hf.get("use_sliding_window") else (0,) * hf["num_hidden_layers"]
        return super().from_hf(hf, qkv_bias=True, o_bias=False, sliding_windows=windows, **overrides)
