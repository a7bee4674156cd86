"""`reft bench` and --threads on the bundled model (the command works; speed is not asserted here)."""
from __future__ import annotations

import json

from test_bad_input import run


def test_bench_json_records(stories_plan):
    p = run("reft", "bench", stories_plan, "-p", "16", "-n", "8", "-r", "2", "--threads", "1", "--output", "json")
    assert p.returncode == 0, p.stderr
    records = json.loads(p.stdout)
    manifest = json.loads((stories_plan / "manifest.json").read_text())
    assert [r["test"] for r in records] == ["pp16", "tg8"]
    for r in records:
        assert r["threads"] == 1 and r["backend"] == manifest["backend"]["name"]
        assert len(r["runs"]) == 2 and all(x > 0 for x in r["runs"])
        assert abs(r["tokens_per_s"] - sum(r["runs"]) / 2) < 1e-6 * r["tokens_per_s"]
        assert r["size_bytes"] == manifest["weights"]["bytes"] and r["params"] == manifest["model"]["params"]
        assert r["peak_rss_bytes"] > r["size_bytes"] and r["kv_cache_bytes"] > 0 and 0 < r["load_s"] < 60


def test_bench_table(stories_plan):
    p = run("reft", "bench", stories_plan, "-p", "8", "-n", "4", "-r", "1")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "| model | size | params | backend | threads | test | t/s |" in lines
    assert sum(line.startswith("| LlamaForCausalLM") for line in lines) == 2
    assert any(line.startswith("peak RSS") for line in p.stdout.splitlines() + p.stderr.splitlines())


def test_bench_prompt_over_batch_limit(stories_plan):
    p = run("reft", "bench", stories_plan, "-p", "100000", "-n", "0")
    assert p.returncode == 1 and p.stderr.strip().startswith("error:") and "max_batch_tokens" in p.stderr
    assert "Traceback" not in p.stderr


def test_thread_count_does_not_change_greedy_text(stories_plan):
    outs = [run("reft", "run", stories_plan, "--prompt", "Once upon a time", "--temperature", "0", "-n", "40",
                "--threads", str(t)) for t in (1, 2)]
    assert all(o.returncode == 0 for o in outs), outs[0].stderr + outs[1].stderr
    assert outs[0].stdout == outs[1].stdout and len(outs[0].stdout) > 40
