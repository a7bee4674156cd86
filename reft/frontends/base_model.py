"""Checkpoints of a bare base model, read under the causal-LM names the families use.

A decoder saved without its language-model wrapper (transformers' `AutoModel`, as embedding
models such as Qwen3-Embedding ship) names its weights `layers.0.self_attn.q_proj.weight`,
`embed_tokens.weight`, `norm.weight`, where the families (Hugging Face's `...ForCausalLM` names,
verbatim) read `model.layers.0...`, and it holds no `lm_head`. `base_model_view` presents such a
checkpoint under the prefixed names; any other checkpoint is returned as it is.
"""
from __future__ import annotations

from typing import Mapping

PREFIX = "model."


class BaseModelWeights(Mapping):
    """A checkpoint mapping whose names gain PREFIX (names that already carry it pass through)."""

    def __init__(self, weights):
        self.weights = weights

    def _source_name(self, name: str) -> str:
        if name.startswith(PREFIX) and name not in self.weights:
            return name[len(PREFIX):]
        return name

    def __getitem__(self, name: str):
        return self.weights[self._source_name(name)]

    def __contains__(self, name) -> bool:
        return self._source_name(name) in self.weights

    def info(self, name: str):
        return self.weights.info(self._source_name(name))

    def __iter__(self):
        return (n if n.startswith(PREFIX) else PREFIX + n for n in self.weights)

    def __len__(self) -> int:
        return len(self.weights)


def base_model_view(weights, graph):
    """`weights` as the graph's params name them: through BaseModelWeights when none of the
    graph's `model.` params is in the checkpoint but their unprefixed names are."""
    wanted = [n.name for n in graph.params() if n.name.startswith(PREFIX)]
    if not wanted or any(w in weights for w in wanted):
        return weights
    if all(w[len(PREFIX):] in weights for w in wanted):
        return BaseModelWeights(weights)
    return weights
