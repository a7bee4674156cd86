"""Speculative decoding through the CLIs and the server on the bundled model: `reft run --prompt`
and `--serve` give the same greedy text with and without drafting, `reft bench --spec-ngram`
reports, and misuse is one error line."""
from __future__ import annotations

import json

from server_util import Server
from test_bad_input import assert_one_error, run

from reft.runtime.engine import Engine
from reft.runtime.generate import GenerationRequest, generate
from reft.runtime.sampler import SamplingParams

PROMPT = "Once upon a time there was a little dog. The little dog liked to run. Once upon a time there was"


def test_run_prompt_is_unchanged_by_drafting(stories_plan):
    args = ("reft", "run", stories_plan, "--prompt", PROMPT, "--temperature", "0", "-n", "48")
    plain = run(*args)
    assert plain.returncode == 0, plain.stderr
    for extra in (("--spec-ngram",), ("--draft", stories_plan, "--spec-tokens", "3")):
        p = run(*args, *extra)
        assert p.returncode == 0, p.stderr
        assert p.stdout == plain.stdout, extra


def test_bench_spec_ngram_reports_and_checks_identity(stories_plan):
    p = run("reft", "bench", stories_plan, "--spec-ngram", "--prompt", PROMPT, "-n", "32", "-r", "1", "-o", "json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["drafter"] == "ngram" and r["identical"] is True and r["generated"] > 0
    assert 0 < r["acceptance_rate"] <= 1 and r["mean_accepted_length"] > 1
    assert r["speedup"] == r["spec_tokens_per_s"] / r["plain_tokens_per_s"]


def test_misuse_is_one_error_line(stories_plan, tmp_path):
    assert_one_error(run("reft", "run", stories_plan, "--prompt", "x", "--spec-ngram", "--draft", stories_plan),
                     "at most one of --draft")
    assert_one_error(run("reft", "bench", stories_plan, "--spec-ngram"), "--prompt")
    assert_one_error(run("reft", "bench", stories_plan, "--prompt", "x"), "--draft or --spec-ngram")
    assert_one_error(run("reft", "run", stories_plan, "--prompt", "x", "--draft", tmp_path / "nothing"), "nothing")


def test_served_greedy_completion_is_unchanged_and_metrics_count_drafts(stories_plan, tmp_path):
    engine = Engine.load(stories_plan)
    ids = engine.tokenizer.encode(PROMPT)
    tok = engine.tokenizer
    out = list(generate(engine, GenerationRequest(ids, 40, SamplingParams(temperature=0), tuple(tok.eos_token_ids))))
    want = tok.decode(ids + out, skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)):]
    s = Server(stories_plan, tmp_path, "--spec-ngram", "--spec-tokens", "4")
    try:
        r = s.client().completions.create(model="stories", prompt=PROMPT, max_tokens=40, temperature=0)
        assert r.choices[0].text == want
        assert s.metric("reft_spec_decode_accepted_tokens_total") > 0
        assert 0 < s.metric("reft_spec_decode_acceptance_rate") <= 1
        assert s.metric("reft_spec_decode_mean_accepted_length") > 1
    finally:
        s.stop()
