"""Structured-output fields of a request -> one GrammarSpec (reft/runtime/grammar.py compiles it).

Accepted, on /v1/chat/completions and /v1/completions alike:
- OpenAI: `response_format` `{"type": "json_object"}` or `{"type": "json_schema", "json_schema":
  {"name", "schema", "strict"}}` (`{"type": "text"}` is no constraint). The schema is always
  enforced, `strict` or not.
- vLLM: `guided_json` (a schema, as an object or JSON text), `guided_regex`, `guided_choice` (a
  list of strings), `guided_grammar` (Lark or GBNF), and the newer `structured_outputs` object with
  the keys json / regex / choice / grammar / json_object.
- llama-server: `grammar` (GBNF, or Lark) and `json_schema`.

More than one of them in a request is a 400 naming both: they would not combine.
"""
from __future__ import annotations

from ..runtime.grammar import GrammarError, GrammarSpec
from .protocol import _Sampling


def _candidates(body: _Sampling) -> list[GrammarSpec]:
    found = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        found.append(GrammarSpec("json_object", None, "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise GrammarError("response_format: type json_schema needs json_schema.schema", "response_format")
        found.append(GrammarSpec("json_schema", rf.json_schema.schema_, "response_format.json_schema.schema"))
    for field, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                        ("guided_grammar", "grammar"), ("grammar", "grammar"), ("json_schema", "json_schema")):
        value = getattr(body, field)
        if value is not None:
            found.append(GrammarSpec(kind, value, field))
    so = body.structured_outputs
    if so is not None:
        for key, kind, value in (("json", "json_schema", so.json_), ("regex", "regex", so.regex),
                                 ("choice", "choice", so.choice), ("grammar", "grammar", so.grammar)):
            if value is not None:
                found.append(GrammarSpec(kind, value, f"structured_outputs.{key}"))
        if so.json_object:
            found.append(GrammarSpec("json_object", None, "structured_outputs.json_object"))
    return found


def grammar_spec(body: _Sampling) -> GrammarSpec | None:
    """The request's one output constraint, or None; GrammarError when it gives several."""
    found = _candidates(body)
    if len(found) > 1:
        names = ", ".join(s.param for s in found)
        raise GrammarError(f"give at most one output constraint; this request has {names}", found[1].param)
    return found[0] if found else None
