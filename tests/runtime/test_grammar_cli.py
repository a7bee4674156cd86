"""`reft run PLAN --prompt/--chat` with --json-schema and --grammar-file: constrained output, and one
clear error line (non-zero exit, no traceback) for files that cannot be used."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema
import pytest

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["ok", "size", "tags"], "additionalProperties": False,
          "x-guidance": {"whitespace_flexible": False}}


def reft(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "reft.cli.reft", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=120)


def one_error(p, *needles):
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and "Traceback" not in p.stderr and len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ") and all(n in lines[0] for n in needles), lines[0]


def test_json_schema_and_grammar_file(stories_plan, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    p = reft("run", stories_plan, "--prompt", "Once", "--json-schema", schema, "--temperature", "1", "--seed", "3",
             "-n", "100")
    assert p.returncode == 0, p.stderr
    jsonschema.validate(json.loads(p.stdout[len("Once"):]), SCHEMA)
    gbnf = tmp_path / "answer.gbnf"
    gbnf.write_text('root ::= ("yes" | "no") " because " [a-z]{3,6}\n')
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}\n{% endfor %}")
    p = reft("run", stories_plan, "--chat", "--chat-template", template, "--grammar-file", gbnf, "--seed", "1",
             stdin="Is it?\nAnd now?\n")
    assert p.returncode == 0, p.stderr
    replies = p.stdout.splitlines()
    assert len(replies) == 2 and all(re.fullmatch(r"(yes|no) because [a-z]{3,6}", r) for r in replies), replies


@pytest.mark.parametrize("name, text, flag, needles", [
    ("bad.json", '{"type": "nope"}', "--json-schema", ["bad.json: ", "Invalid type"]),
    ("notjson.json", "{oops", "--json-schema", ["notjson.json: not valid JSON"]),
    ("bad.gbnf", "root ::= (", "--grammar-file", ["bad.gbnf: ", "GBNF"]),
    ("bad.lark", "start: missing_rule", "--grammar-file", ["bad.lark: ", "missing_rule"]),
    ("absent.gbnf", None, "--grammar-file", ["absent.gbnf: cannot read"]),
])
def test_bad_files_are_one_error_line(stories_plan, tmp_path, name, text, flag, needles):
    f = tmp_path / name
    if text is not None:
        f.write_text(text)
    one_error(reft("run", stories_plan, "--prompt", "Once", flag, f), *needles)


def test_flags_that_do_not_combine(stories_plan, tmp_path):
    f = tmp_path / "s.json"
    f.write_text("{}")
    one_error(reft("run", stories_plan, "--prompt", "x", "--json-schema", f, "--grammar-file", f), "at most one")
    one_error(reft("run", stories_plan, "--serve", "--json-schema", f), "apply to --prompt and --chat")
