"""Structured output through the official openai client against the real server: response_format
(json_object, json_schema), vLLM's guided_* and structured_outputs, llama-server's grammar and
json_schema, on chat and completions, streamed and whole, mixed with free requests; rejected
schemas and grammars are 400s naming the problem."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

MESSAGES = [{"role": "user", "content": "Describe a person."}]
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"type": "object", "properties": {
        "kind": {"enum": ["cat", "dog", "fish"]}, "legs": {"type": "integer", "minimum": 0, "maximum": 4}},
        "required": ["kind", "legs"], "additionalProperties": False}, "maxItems": 2},
    "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                              "owner": {"type": "boolean"}},
             "required": ["city", "owner"], "additionalProperties": False}},
    "required": ["name", "age", "pets", "home"], "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False}}   # compact: the random test model loves whitespace tokens
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


def test_json_schema_chat_20_seeds(client):
    """Ten choices (seeds 1..10) whole and ten (11..20) streamed, at temperature 1: every one
    parses and validates against the schema, and stops when the object is complete."""
    r = client.chat.completions.create(model="stories", messages=MESSAGES, response_format=FORMAT, n=10, seed=1,
                                       temperature=1.0, max_tokens=300)
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
        assert c.finish_reason == "stop"
    texts, reasons = [""] * 10, [None] * 10
    for chunk in client.chat.completions.create(model="stories", messages=MESSAGES, response_format=FORMAT, n=10,
                                                seed=11, temperature=1.0, max_tokens=300, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert reasons == ["stop"] * 10


def test_json_object_and_schema_fields_on_completions(client):
    # any object: its strings are unbounded, so a random model may well run to max_tokens inside one
    r = client.completions.create(model="stories", prompt="Once upon a time", max_tokens=30, temperature=1.0, seed=5,
                                  extra_body={"response_format": {"type": "json_object"}})
    text = r.choices[0].text
    assert text.startswith("{") and (r.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))
    small = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
             "required": ["ok", "n"], "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}
    for field in ("guided_json", "json_schema"):        # vLLM's and llama-server's names
        r = client.completions.create(model="stories", prompt="Once", max_tokens=40, temperature=1.0, seed=2,
                                      extra_body={field: small})
        jsonschema.validate(json.loads(r.choices[0].text), small)
    r = client.completions.create(model="stories", prompt="Once", max_tokens=40, temperature=1.0,
                                  extra_body={"structured_outputs": {"json": json.dumps(small)}})
    jsonschema.validate(json.loads(r.choices[0].text), small)


def test_choice_regex_and_grammars(client):
    choices = ["red", "green", "a \"quoted\" one"]
    for seed in range(4):
        r = client.completions.create(model="stories", prompt="Once", max_tokens=20, temperature=1.0, seed=seed,
                                      extra_body={"guided_choice": choices})
        assert r.choices[0].text in choices and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="stories", messages=MESSAGES, max_tokens=20, temperature=1.0,
                                       extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].message.content in ("yes", "no")
    r = client.completions.create(model="stories", prompt="Once", max_tokens=30, temperature=1.0, seed=1,
                                  extra_body={"guided_regex": r"[A-Z][a-z]{2,5} [0-9]{2}"})
    assert re.fullmatch(r"[A-Z][a-z]{2,5} [0-9]{2}", r.choices[0].text)
    gbnf = 'root ::= greeting " " number\ngreeting ::= "hi" | "hello"\nnumber ::= [1-9] [0-9]?'
    lark = 'start: GREETING " " NUMBER\nGREETING: "hi" | "hello"\nNUMBER: /[1-9][0-9]?/'
    for field, grammar in (("grammar", gbnf), ("guided_grammar", lark), ("guided_grammar", gbnf)):
        chunks = list(client.completions.create(model="stories", prompt="Once", max_tokens=20, temperature=1.0,
                                                stream=True, extra_body={field: grammar}))
        text = "".join(c.choices[0].text for c in chunks)
        assert re.fullmatch(r"(hi|hello) [1-9][0-9]?", text), (field, text)


def test_mixed_batch_of_constrained_and_free(client):
    """Free greedy requests running beside constrained ones give exactly what they give alone."""
    free = dict(model="stories", prompt="Once upon a time", max_tokens=40, temperature=0)
    alone = client.completions.create(**free).choices[0].text

    def constrained(seed):
        return client.completions.create(model="stories", prompt="Once upon a time", max_tokens=300, temperature=1.0,
                                         seed=seed, extra_body={"guided_json": SCHEMA}).choices[0].text
    with ThreadPoolExecutor(6) as pool:
        jobs = [pool.submit(constrained, s) for s in range(4)] + [pool.submit(
            lambda: client.completions.create(**free).choices[0].text) for _ in range(2)]
        results = [j.result() for j in jobs]
    for text in results[:4]:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert results[4:] == [alone, alone]


@pytest.mark.parametrize("extra, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "Invalid type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "needs json_schema.schema"),
    ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}, "nowhere"),
    ({"guided_regex": "a(b"}, "unclosed group"),
    ({"grammar": "root ::= ("}, "grammar"),
    ({"guided_choice": []}, "non-empty list"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "at most one output constraint"),
    ({"response_format": {"type": "json_object"}, "json_schema": {"type": "object"}}, "response_format, json_schema"),
])
def test_rejected_constraints_are_400(server, client, extra, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="stories", messages=MESSAGES, max_tokens=5, extra_body=extra)
    assert words in e.value.body["message"]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 5, **extra})
    assert r.status_code == 400 and words in r.json()["error"]["message"]
    assert server.healthy()


def test_text_format_is_no_constraint(client):
    r = client.chat.completions.create(model="stories", messages=MESSAGES, max_tokens=8, temperature=0,
                                       response_format={"type": "text"}, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
