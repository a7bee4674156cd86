"""Batch-invariant cpu kernels: a sequence's logits are bit for bit the same whether its prompt is
prefilled at once, in chunks, token by token, beside another sequence, or after a prefix-cache hit.
Two ways to get them: a plan compiled with `reftc compile --deterministic` (every step), or a
reproducible sequence on a default plan (Engine.new_sequence(reproducible=True): the steps it is in
switch the kernels to that mode; what the server does for seeded requests). For a float plan and
quantized ones: reft's weight-only int8 and int4, and a GGUF in Q4_1, whose activations are rounded
to int16 for integer dot products."""
from __future__ import annotations

import numpy as np
import pytest
from gguf_util import requantized
from hf_tiny import make_model
from paths import SHARED_MODELS

from reft.compiler import compile_model
from reft.runtime.engine import Chunk, Engine

STORIES_GGUF = SHARED_MODELS / "stories260K" / "stories260K.gguf"


@pytest.fixture(scope="module", params=["f32-deterministic", "int8-deterministic", "int4-deterministic",
                                        "f32-reproducible", "int4-reproducible", "q4_1-reproducible"])
def engine(request, stories_dir, tmp_path_factory):
    """(engine, reproducible): stories260K in float32; quantized, a tiny random Llama (stories260K's
    172-wide MLP rows do not fit the formats' 32-value blocks) or stories260K.gguf with its whole-block
    matrices in Q4_1. `-deterministic`: compiled so; `-reproducible`: a default plan whose test
    sequences are reproducible."""
    kind, mode = request.param.split("-")
    d = tmp_path_factory.mktemp("det")
    if kind == "q4_1":
        if not STORIES_GGUF.is_file():
            pytest.skip("shared/models/stories260K is absent")
        src = requantized(STORIES_GGUF, d / "q4_1.gguf", "Q4_1")
    else:
        src = stories_dir if kind == "f32" else make_model("llama-gqa-llama3", d / "hf")[0]
    det = mode == "deterministic"
    plan = compile_model(src, d / "plan", progress=False, deterministic=det,
                         quant=kind if kind in ("int8", "int4") else None)
    e = Engine.load(plan, kv_tokens=8192)
    assert e.plan.manifest["backend"]["deterministic"] is det and e.supports_reproducible
    if kind == "q4_1":
        assert e.plan.manifest["quantization"]["matrices"].get("q4_1", 0) >= 15, e.plan.manifest["quantization"]
    return e, not det


def run(engine, seqs_pieces) -> list[np.ndarray]:
    """Prefill each (tokens, piece size) sequence in pieces, all sequences side by side in each step;
    every row's logits, per sequence."""
    engine, repro = engine
    seqs = [engine.new_sequence(t, reproducible=repro) for t, _ in seqs_pieces]
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
    engine, repro = engine
    engine.pool.reset_prefix_cache()
    first = engine.new_sequence(toks, reproducible=repro)
    engine.prefill(first)
    first.register_pages()
    second = engine.new_sequence(toks, reproducible=repro)
    assert second.match_prefix() == 144
    last = engine.step([Chunk(second, len(toks) - 144, "all")])[0]
    first.release()
    second.release()
    assert np.array_equal(last, whole[144:])
