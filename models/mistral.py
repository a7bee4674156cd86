"""Mistral (MistralForCausalLM): the Llama decoder with sliding-window attention on every layer.

Notable: `sliding_window` (when set) bounds every layer's attention to the last W positions.
"""
from __future__ import annotations

from .llama import Config as LlamaConfig
from .llama import build  # noqa: F401  (same graph as Llama)

ARCHITECTURES = ("MistralForCausalLM",)


class Config(LlamaConfig):
    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "Config":
        window = hf.get("sliding_window") or 0
        return super().from_hf(hf, sliding_windows=(window,) * hf["num_hidden_layers"], **overrides)
