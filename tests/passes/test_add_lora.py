"""add_lora: the rewritten graph computes the base model with W + s * B @ A in place of each target
weight (reference interpreter, random A and B), prints and parses back, counts what it adapted,
inits A as PEFT does (deterministic per module) and B as zeros, and names what it cannot do."""
from __future__ import annotations

import numpy as np
import pytest

from reft.compiler import ASSETS, bind_weights, build_graph, model_config
from reft.errors import ReftError
from reft.frontends.source import open_source
from reft.ir import parse_graph, print_graph, verify
from reft.ir.interpret import ReferenceExecutor
from reft.passes.add_lora import SCALING, LoraConfig, add_lora, lora_a_init
from reft.passes.context import PassContext, WeightStore

IDS = np.array([1, 5, 77, 300, 12, 9], np.int32)


@pytest.fixture(scope="module")
def stories():
    src = open_source(ASSETS / "stories260K")
    return src, model_config(src)


def forward(src, cfg):
    g = build_graph(src.family, cfg)
    bind_weights(g, src.weights, "stories260K")
    return g


def logits(graph, weights):
    n = len(IDS)
    kv = {}
    for node in graph.inputs():
        if node.name.startswith("kv_cache"):
            kv[node.name] = np.zeros((1, 16) + node.out.shape[2:], np.float32)
    feeds = {"input_ids": IDS, "positions": np.arange(n, dtype=np.int32), "seq_ids": np.zeros(n, np.int32),
             "logit_rows": np.arange(n, dtype=np.int32), **kv}
    return ReferenceExecutor(graph, weights).run(feeds)["logits"]


def test_adapted_graph_equals_merged_weights(stories):
    src, cfg = stories
    lora = LoraConfig(r=4, alpha=8.0, targets=("q_proj", "down_proj"), seed=3)
    ctx = PassContext(WeightStore(src.weights), options={"lora": lora})
    g = add_lora(forward(src, cfg), ctx)
    verify(g)
    assert ctx.counters[""]["adapted"] == 2 * cfg.num_hidden_layers
    assert sorted(ctx.options["trainable"])[:2] == ["model.layers.0.mlp.down_proj.lora_A.weight",
                                                    "model.layers.0.mlp.down_proj.lora_B.weight"]
    assert print_graph(parse_graph(print_graph(g))) == print_graph(g)
    rng = np.random.default_rng(0)
    weights = {n: np.asarray(ctx.weights[n], np.float32) for n in ctx.weights if n in {p.name for p in g.params()}}
    merged = dict(weights)
    for name in ctx.options["trainable"]:
        if name.endswith("lora_B.weight"):
            weights[name] = rng.normal(0, 0.1, weights[name].shape).astype(np.float32)
    for name in ctx.options["trainable"]:
        if name.endswith("lora_A.weight"):
            module = name[:-len(".lora_A.weight")]
            delta = weights[module + ".lora_B.weight"] @ weights[name] * lora.scale
            merged[module + ".weight"] = (weights[module + ".weight"] + delta).astype(np.float32)
    assert float(weights[SCALING]) == 2.0
    np.testing.assert_allclose(logits(g, weights), logits(forward(src, cfg), merged), rtol=1e-4, atol=1e-4)


def test_fresh_adapter_is_the_base_model(stories):
    src, cfg = stories
    ctx = PassContext(WeightStore(src.weights), options={"lora": LoraConfig()})
    g = add_lora(forward(src, cfg), ctx)
    names = {p.name for p in g.params()}
    weights = {n: np.asarray(ctx.weights[n], np.float32) for n in names}
    base = {n: np.asarray(src.weights[n], np.float32) for n in src.weights}
    np.testing.assert_allclose(logits(g, weights), logits(forward(src, cfg), base), rtol=1e-5, atol=1e-5)
    a = weights["model.layers.1.self_attn.v_proj.lora_A.weight"]
    assert a.shape == (8, cfg.hidden_size) and np.abs(a).max() <= 1 / np.sqrt(cfg.hidden_size)
    np.testing.assert_array_equal(a, lora_a_init("model.layers.1.self_attn.v_proj", 8, cfg.hidden_size, 0))
    assert not weights["model.layers.1.self_attn.v_proj.lora_B.weight"].any()


def test_kept_tensors_and_errors(stories):
    src, cfg = stories
    a = np.full((8, cfg.hidden_size), 0.5, np.float32)
    store = WeightStore(src.weights)
    store.define("model.layers.0.self_attn.q_proj.lora_A.weight", lambda: a)
    add_lora(forward(src, cfg), PassContext(store, options={"lora": LoraConfig()}))
    assert store["model.layers.0.self_attn.q_proj.lora_A.weight"] is a          # a resumed adapter stays
    with pytest.raises(ReftError, match="'lm_head' is not in the model"):
        add_lora(forward(src, cfg), PassContext(WeightStore(src.weights),
                                                 options={"lora": LoraConfig(targets=("q_proj", "lm_head"))}))
    with pytest.raises(ReftError, match="dropout"):
        add_lora(forward(src, cfg), PassContext(WeightStore(src.weights), options={"lora": LoraConfig(dropout=1.0)}))
