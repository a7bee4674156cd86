"""Every pass preserves outputs: the reference executor gives the same results before and
after it, on random graphs (tests/strategies.random_graphs)."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from strategies import random_graphs

from reft.backends.reference import ReferenceExecutor
from reft.ir import parse_graph, print_graph
from reft.passes.context import PassContext, WeightStore
from reft.passes.manager import PassManager
from reft.passes.pipeline import PIPELINE

PASSES = {name: fn for name, fn in PIPELINE}


def run(graph, weights, feeds):
    return ReferenceExecutor(graph, weights).run({k: np.array(v) for k, v in feeds.items()})


def complete_feeds(graph, feeds):
    """Feeds for inputs a pass added: a page table and zeroed KV-cache pages."""
    feeds = dict(feeds)
    names = {n.name: n for n in graph.inputs()}
    if "page_table" in names:
        sid = feeds["seq_ids"]
        caches = [n for n in graph.inputs() if n.name.startswith("kv_cache.")]
        page = caches[0].out.shape[1]
        n_seqs = int(sid.max()) + 1
        need = [-(-int(np.sum(sid == s)) // page) for s in range(n_seqs)]
        mp, total = max(need), sum(need)
        pages = np.random.default_rng(0).permutation(total + 1).astype(np.int32)  # shuffled, one spare
        table = np.zeros((n_seqs, mp), np.int32)
        at = 0
        for s, k in enumerate(need):
            table[s, :k] = pages[at:at + k]
            at += k
        feeds["page_table"] = table
        for n in caches:
            feeds[n.name] = np.zeros((total + 1,) + n.out.shape[1:], np.float32)
    return feeds


def apply(passes, graph, weights, **options):
    copy = parse_graph(print_graph(graph))
    ctx = PassContext(WeightStore(weights), options={"page_size": 2, **options})
    return PassManager(passes).run(copy, ctx), ctx


@pytest.mark.parametrize("name", sorted(PASSES))
@settings(max_examples=40, deadline=None)
@given(case=random_graphs())
def test_pass_preserves_outputs(name, case):
    graph, weights, feeds = case
    want = run(graph, weights, feeds)
    after, ctx = apply([(name, PASSES[name])], graph, weights)
    got = run(after, ctx.weights, complete_feeds(after, feeds))
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(case=random_graphs(attention=True))
def test_whole_pipeline_preserves_outputs(case):
    graph, weights, feeds = case
    want = run(graph, weights, feeds)
    after, ctx = apply(PIPELINE, graph, weights)
    assert any(n.op == "paged_attention" for n in after.nodes)
    got = run(after, ctx.weights, complete_feeds(after, feeds))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(case=random_graphs())
def test_bfloat16_weights_equal_rounding_the_checkpoint(case):
    """cast_weights to bfloat16 computes exactly what the graph computes on bf16-rounded matrices."""
    graph, weights, feeds = case
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) if v.ndim >= 2 else v for k, v in weights.items()}
    want = run(graph, rounded, feeds)
    after, ctx = apply(PIPELINE, graph, weights, weight_dtype="bfloat16")
    got = run(after, ctx.weights, complete_feeds(after, feeds))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)
