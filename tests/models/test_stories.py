"""The bundled stories260K model reproduces what transformers produced for it
(tests/data/stories260K_reference_outputs.json, copied from shared/models)."""
from __future__ import annotations

import numpy as np

from reft.runtime.engine import Engine
from reft.runtime.generate import GenerationRequest, generate
from reft.runtime.perplexity import perplexity
from reft.runtime.sampler import SamplingParams


def test_prompt_tokenizes_like_reference(stories_plan, stories_reference):
    tok = Engine.load(stories_plan).tokenizer
    assert tok.encode(stories_reference["prompt"]) == stories_reference["prompt_ids"]


def test_greedy_64_ids_exact(stories_plan, stories_reference):
    engine = Engine.load(stories_plan)
    req = GenerationRequest(stories_reference["prompt_ids"], 64, SamplingParams(temperature=0.0))
    ids = list(generate(engine, req))
    assert ids == stories_reference["greedy_64_ids"]
    assert engine.tokenizer.decode(ids) == stories_reference["greedy_64_text"]


def test_last_logits_top5(stories_plan, stories_reference):
    logits = Engine.load(stories_plan).logits(stories_reference["prompt_ids"])[-1]
    for tok, value in stories_reference["last_logits_top5"]:
        assert abs(logits[tok] - value) < 1e-4


def test_perplexity_within_1e4(stories_plan, stories_reference):
    engine = Engine.load(stories_plan)
    ids = engine.tokenizer.encode(stories_reference["ppl_text"])
    r = perplexity(engine, ids)
    assert r.tokens_scored == len(ids) - 1
    assert abs(r.ppl - stories_reference["ppl"]) / stories_reference["ppl"] < 1e-4
    assert abs(r.mean_nll - stories_reference["mean_nll"]) / stories_reference["mean_nll"] < 1e-4


def test_bfloat16_plan_stays_close(tmp_path, stories_dir, stories_reference):
    from reft.compiler import compile_model

    plan = compile_model(stories_dir, tmp_path / "bf16", dtype="bfloat16", progress=False)
    f32 = Engine.load(compile_model(stories_dir, tmp_path / "f32", progress=False))
    bf = Engine.load(plan)
    ids = stories_reference["prompt_ids"]
    a, b = f32.logits(ids), bf.logits(ids)
    assert np.abs(a - b).max() < 0.5 and np.argmax(a[-1]) == np.argmax(b[-1])
    assert bf.plan.manifest["weights"]["bytes"] < 0.6 * f32.plan.manifest["weights"]["bytes"]
