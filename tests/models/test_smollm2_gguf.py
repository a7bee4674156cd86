"""SmolLM2-135M-Instruct, llama.cpp's Q4_1 GGUF (the plan keeps its Q4_1 and Q8_0 blocks and the
cpu kernels dequantize them on the fly), against what transformers produced from the same
dequantized weights (shared/models/smollm2-135m-instruct/reference_outputs.json). The file comes
from tools/fetch_smollm2.py (CI runs it); without it these skip."""
from __future__ import annotations

import json

import pytest
from paths import SHARED_MODELS, SMOLLM2_GGUF

from reft.compiler import compile_model
from reft.runtime.engine import Engine
from reft.runtime.generate import GenerationRequest, generate
from reft.runtime.perplexity import perplexity
from reft.runtime.sampler import SamplingParams

REFERENCE = SHARED_MODELS / "smollm2-135m-instruct" / "reference_outputs.json"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(SMOLLM2_GGUF is None, reason="no SmolLM2 GGUF: run tools/fetch_smollm2.py"),
              pytest.mark.skipif(not REFERENCE.is_file(), reason="shared/models is absent")]
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def reference():
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine.load(compile_model(SMOLLM2_GGUF, tmp_path_factory.mktemp("smol") / "plan", progress=False))


def test_source_is_the_q4_1_file(engine):
    m = engine.plan.manifest["model"]
    assert m["gguf_tensor_types"] == {"Q8_0": 1, "Q4_1": 210, "F32": 61}
    assert m["config"]["tie_word_embeddings"] and m["params"] == 134_515_008
    q = engine.plan.manifest["quantization"]
    assert q["method"] == "gguf" and q["embedding"] == "q8_0" and set(q["matrices"]) == {"q4_1", "q8_0"}


def test_first_16_greedy_ids(engine, reference):
    assert engine.tokenizer.encode(reference["prompt"]) == reference["prompt_ids"]
    ids = list(generate(engine, GenerationRequest(reference["prompt_ids"], 16, GREEDY)))
    assert ids == reference["greedy_32_ids"][:16]


def test_perplexity_within_1_percent(engine, reference):
    ids = engine.tokenizer.encode(reference["ppl_text"])
    assert len(ids) == reference["ppl_ntokens"]
    r = perplexity(engine, ids)
    assert r.tokens_scored == len(ids) - 1
    assert abs(r.ppl - reference["ppl"]) / reference["ppl"] < 0.01


def test_chat_answers_paris(engine):
    tok = engine.tokenizer
    prompt = tok.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    req = GenerationRequest(tok.encode(prompt, add_special_tokens=False), 24, GREEDY, tuple(tok.eos_token_ids))
    answer = tok.decode(list(generate(engine, req)), skip_special_tokens=True)
    assert "Paris" in answer
