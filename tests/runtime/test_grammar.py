"""Structured output in the runtime: the vocabulary llguidance gets (real bytes for SentencePiece
byte-fallback and byte-level BPE tokenizers, from tokenizer.json and from GGUF metadata), the
sampler's mask, and ServingEngine batches mixing constrained and free sequences."""
from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
from paths import SHARED_MODELS, SMOL_TOKENIZER, SMOLLM2_GGUF

from reft.frontends.tokenizer import Tokenizer
from reft.runtime.engine import Engine
from reft.runtime.grammar import GrammarCompiler, GrammarError, GrammarSpec, canonical_encoder, vocabulary
from reft.runtime.sampler import Sampler, SamplingParams
from reft.runtime.serving import Request, ServingEngine

TEXTS = ["Hello world", "  two  spaces\n\tand tabs", 'quotes "and" {braces}: [1, 2]', "é ü 中文 😀", "x"]
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2},
    "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"}},
             "required": ["city", "ok"], "additionalProperties": False}},
    "required": ["name", "age", "pets", "home"], "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False}}   # the random test model loves whitespace tokens


def _tokenizers():
    from reft.compiler import ASSETS
    from reft.frontends.gguf_file import GGUFFile
    from reft.frontends.gguf_tokenizer import tokenizer_from_gguf

    out = [pytest.param(lambda: Tokenizer.from_dir(ASSETS / "stories260K"), id="spm-byte-fallback-hf")]
    stories_gguf = SHARED_MODELS / "stories260K" / "stories260K.gguf"
    out.append(pytest.param(lambda: tokenizer_from_gguf(GGUFFile(stories_gguf).metadata, "stories"), id="spm-gguf",
                            marks=pytest.mark.skipif(not stories_gguf.is_file(), reason="shared models absent")))
    out.append(pytest.param(lambda: Tokenizer.from_dir(SMOL_TOKENIZER), id="byte-level-hf",
                            marks=pytest.mark.skipif(not SMOL_TOKENIZER.is_dir(), reason="shared models absent")))
    out.append(pytest.param(lambda: tokenizer_from_gguf(GGUFFile(SMOLLM2_GGUF).metadata, "smol"), id="byte-level-gguf",
                            marks=pytest.mark.skipif(SMOLLM2_GGUF is None, reason="no SmolLM2 GGUF")))
    return out


@pytest.mark.parametrize("make", _tokenizers())
def test_vocabulary_bytes_spell_the_text(make):
    tok = make()
    tokens, special = vocabulary(tok, tok.vocab_size + 3)
    assert len(tokens) == tok.vocab_size + 3 and tokens[-1] == b""   # ids past the tokenizer: never allowed
    assert set(tok.eos_token_ids) <= set(special)
    encode = canonical_encoder(tok)
    for text in TEXTS:
        ids = encode(text)
        assert b"".join(tokens[i] for i in ids) == text.encode("utf-8"), text
        # the model's own tokenizer may add a SentencePiece space in front, nothing else
        spelled = b"".join(tokens[i] for i in tok.encode(text, add_special_tokens=False)).decode("utf-8")
        assert spelled in (text, " " + text)
        assert tok.decode(ids) in (text, text[1:])   # (SentencePiece decoders drop one leading space)


@pytest.fixture(scope="module")
def engine(stories_plan):
    return Engine.load(stories_plan)


@pytest.fixture(scope="module")
def compiler(engine):
    return GrammarCompiler(engine.tokenizer, int(engine.plan.manifest["vocab_size"]))


def test_choice_masks_and_completion(compiler, engine):
    c = compiler.compile(GrammarSpec("choice", ["yes", "no way"]))
    m = c.start()
    allowed = compiler.allowed_tokens([m])[0]
    tokens, _ = vocabulary(engine.tokenizer, compiler.vocab_size)
    ok = [tokens[i] for i in np.flatnonzero(allowed)]
    assert ok and all(b"yes".startswith(t) or b"no way".startswith(t) for t in ok)
    assert not allowed[engine.tokenizer.eos_token_ids].any()       # EOS only where the grammar may end
    for t in canonical_encoder(engine.tokenizer)("no way"):
        assert m.consume_token(t)
    assert m.is_stopped()


@pytest.mark.parametrize("spec, words", [
    (GrammarSpec("json_schema", {"type": "nope"}, "guided_json"), "Invalid type"),
    (GrammarSpec("json_schema", "{not json", "guided_json"), "guided_json"),
    (GrammarSpec("json_schema", [1], "guided_json"), "JSON object"),
    (GrammarSpec("regex", "a(b", "guided_regex"), "unclosed group"),
    (GrammarSpec("grammar", 'root ::= "a" | (', "grammar"), "grammar"),
    (GrammarSpec("grammar", "start: undefined_rule", "grammar"), "undefined_rule"),
    (GrammarSpec("choice", [], "guided_choice"), "non-empty list"),
    (GrammarSpec("regex", "  ", "guided_regex"), "non-empty string"),
])
def test_rejected_grammars_name_the_problem(compiler, spec, words):
    with pytest.raises(GrammarError) as e:
        compiler.compile(spec)
    assert words in str(e.value) and str(e.value).startswith(spec.param) and e.value.param == spec.param
    assert "\n" not in str(e.value)


def test_sampler_mask():
    logits = np.array([5.0, 1.0, 3.0, 2.0], np.float32)
    allowed = np.array([False, True, False, True])
    assert Sampler(SamplingParams(temperature=0))(logits, (), allowed) == 3
    s = Sampler(SamplingParams(temperature=1.5, top_p=1.0, top_k=3, seed=1))
    assert {s(logits, (), allowed) for _ in range(200)} == {1, 3}
    idx, probs = s.distribution(logits, (), allowed)
    assert set(idx.tolist()) == {1, 3} and probs.sum() == pytest.approx(1)


def _run(serving: ServingEngine, reqs: list[Request]) -> dict[str, tuple[str, list[int], str]]:
    for r in reqs:
        serving.add(r)
    out = {r.id: ["", [], None] for r in reqs}
    while serving.has_work:
        for o in serving.step():
            out[o.request_id][0] += o.text
            out[o.request_id][1] += o.token_ids
            out[o.request_id][2] = o.finish_reason or out[o.request_id][2]
    return {k: tuple(v) for k, v in out.items()}


def test_mixed_batch(engine):
    """Constrained and free sequences share steps; each constrained one follows its grammar and
    stops when it is complete; a free one gives exactly what it gives alone."""
    serving = ServingEngine(engine, max_num_seqs=8)
    prompt = engine.tokenizer.encode("Once upon a time")
    schema = serving.grammars.compile(GrammarSpec("json_schema", SCHEMA))
    digits = serving.grammars.compile(GrammarSpec("regex", r"[0-9]{3}-[a-z]{2}"))
    free = lambda i: Request(f"free{i}", prompt, 30, SamplingParams(temperature=0.8, seed=i))  # noqa: E731
    alone = _run(serving, [free(0)])["free0"]
    reqs = [free(0), *(Request(f"json{i}", prompt, 300, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=i),
                               grammar=schema) for i in range(4)),
            Request("regex", prompt, 20, SamplingParams(temperature=1.0, seed=9), grammar=digits, ignore_eos=True)]
    got = _run(serving, reqs)
    assert got["free0"] == alone
    for i in range(4):
        text, _, reason = got[f"json{i}"]
        assert reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)
    text, ids, reason = got["regex"]
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text) and reason == "stop"   # complete: stopped despite ignore_eos
    assert serving.pool.used_pages == 0


def test_default_json_whitespace_is_bounded(engine):
    """Without x-guidance options, JSON may hold whitespace, but at most 20 characters in a row."""
    serving = ServingEngine(engine, max_num_seqs=4)
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"enum": [1, 2]}},
              "required": ["a", "b"], "additionalProperties": False}
    c = serving.grammars.compile(GrammarSpec("json_schema", schema))
    prompt = engine.tokenizer.encode("Once upon a time")
    got = _run(serving, [Request(f"r{i}", prompt, 200, SamplingParams(temperature=1.0, seed=i), grammar=c)
                         for i in range(3)])
    for text, _, reason in got.values():
        assert reason == "stop" and json.loads(text)["b"] in (1, 2)
        assert max(map(len, re.findall(r"\s+", text))) <= 20 and re.search(r"\s", text)
