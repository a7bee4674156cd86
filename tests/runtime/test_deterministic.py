"""`reftc compile --deterministic` (batch-invariant cpu kernels): a sequence's logits are bit for bit
the same whether its prompt is prefilled at once, in chunks, token by token, beside another
sequence, or after a prefix-cache hit — for a float plan and for quantized ones (reft's int8 and
int4, whose activations are rounded to int16 as llama.cpp's types do)."""
from __future__ import annotations

import numpy as np
import pytest
from hf_tiny import make_model

from reft.compiler import compile_model
from reft.runtime.engine import Chunk, Engine


@pytest.fixture(scope="module", params=[None, "int8", "int4"])
def engine(request, stories_dir, tmp_path_factory):
    """stories260K in float32; quantized, a tiny random Llama (stories260K's 172-wide MLP rows do not
    fit the formats' 32-value blocks)."""
    d = tmp_path_factory.mktemp("det")
    src = stories_dir if request.param is None else make_model("llama-gqa-llama3", d / "hf")[0]
    plan = compile_model(src, d / "plan", progress=False, deterministic=True, quant=request.param)
    assert Engine.load(plan, kv_tokens=64).plan.manifest["backend"]["deterministic"] is True
    return Engine.load(plan, kv_tokens=8192)


def run(engine, seqs_pieces) -> list[np.ndarray]:
    """Prefill each (tokens, piece size) sequence in pieces, all sequences side by side in each step;
    every row's logits, per sequence."""
    seqs = [engine.new_sequence(t) for t, _ in seqs_pieces]
    out = [[] for _ in seqs]
    try:
        while any(s.cached < len(s.tokens) for s in seqs):
            chunks, who = [], []
            for i, (s, (_, piece)) in enumerate(zip(seqs, seqs_pieces)):
                if s.cached < len(s.tokens):
                    chunks.append(Chunk(s, min(piece, len(s.tokens) - s.cached), "all"))
                    who.append(i)
            for i, rows in zip(who, engine.step(chunks)):
                out[i].append(rows)
    finally:
        for s in seqs:
            s.release()
    return [np.concatenate(o) for o in out]


def test_logits_do_not_depend_on_chunking_batch_or_prefix_cache(engine):
    rng = np.random.default_rng(0)
    toks = rng.integers(3, 500, 150).tolist()
    other = rng.integers(3, 500, 90).tolist()
    [whole] = run(engine, [(toks, 512)])
    for pieces in ([(toks, 37)], [(toks, 1)], [(other, 512), (toks, 512)], [(other, 7), (toks, 64)]):
        got = run(engine, pieces)[-1]
        assert np.array_equal(got, whole), [p for _, p in pieces]
    # a prefix-cache hit: the first 144 tokens' pages come from an earlier sequence
    engine.pool.reset_prefix_cache()
    first = engine.new_sequence(toks)
    engine.prefill(first)
    first.register_pages()
    second = engine.new_sequence(toks)
    assert second.match_prefix() == 144
    last = engine.step([Chunk(second, len(toks) - 144, "all")])[0]
    first.release()
    second.release()
    assert np.array_equal(last, whole[144:])
