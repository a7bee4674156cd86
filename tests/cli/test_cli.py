"""The CLIs end to end on the bundled model: compile, inspect, run, chat, perplexity, --dump."""
from __future__ import annotations

import json
import sys

from test_bad_input import run

from reft.ir import parse_graph, verify


def test_help_for_every_command():
    for args in (["reftc"], ["reftc", "compile"], ["reftc", "inspect"], ["reft"], ["reft", "run"],
                 ["reft", "perplexity"]):
        p = run(*args, "--help")
        assert p.returncode == 0 and "Usage:" in p.stdout, args


def test_compile_by_bundled_name_with_dump(tmp_path, stories_reference):
    out, dump = tmp_path / "plan", tmp_path / "dump"
    p = run("reftc", "compile", "stories260K", "-o", out, "--dump", dump)
    assert p.returncode == 0, p.stderr
    for sub in ("manifest.json", "graphs/forward.ir", "kernels", "weights/model.safetensors",
                "tokenizer/tokenizer.json", "dumps/final.dot"):
        assert (out / sub).exists(), sub
    irs = sorted(x.name for x in dump.glob("*.ir"))
    assert irs[0] == "000_input.ir" and any("fuse_projections" in x for x in irs)
    for f in dump.glob("*.ir"):  # every dump parses back into a valid graph
        verify(parse_graph(f.read_text()))
    assert (dump / "final.dot").read_text().startswith("digraph")
    fusion = (dump / "fusion.txt").read_text().splitlines()   # 5 layers
    kinds = [line.split(": ")[1].split(" [")[0] for line in fusion]
    assert (kinds.count("qkv_rope"), kinds.count("linear_glu"), kinds.count("add_rms_norm")) == (5, 5, 9)  # the final norm reads only the logit rows
    assert any("layers.0." in line and line.endswith("<- linear + split + silu + mul") for line in fusion)
    assert set(json.loads((dump / "memory.json").read_text())) >= {"1", "512"}
    m = json.loads((out / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["model"]["architecture"] == "LlamaForCausalLM"
    assert m["kv_cache"]["num_layers"] == 5 and m["kv_cache"]["page_size"] == 16
    assert {"input_ids", "positions", "seq_ids", "logit_rows", "page_table"} <= set(
        m["entry_points"]["forward"]["inputs"])


def test_inspect(stories_plan):
    p = run("reftc", "inspect", stories_plan)
    assert p.returncode == 0, p.stderr
    for needle in ("LlamaForCausalLM", "292,800 params", "fuse_projections", "fused_3=5", "entry points",
                   "forward(", "kernels", "weights"):
        assert needle in p.stdout, needle


def test_run_prompt_greedy_continues_with_lily(stories_plan, stories_reference):
    p = run("reft", "run", stories_plan, "--prompt", "Once upon a time", "--temperature", "0", "-n", "64")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "Once upon a time" + stories_reference["greedy_64_text"] + "\n"


def test_run_stop_string(stories_plan):
    p = run("reft", "run", stories_plan, "--prompt", "Once upon a time", "--temperature", "0", "--stop", "Lily")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "Once upon a time, there was a little girl named \n"


def test_run_special_tokens_hidden_unless_asked(stories_plan, tmp_path):
    """A special token the model generates mid-text is left out of what `reft run` prints (as
    llama.cpp and vLLM do) and printed with --special. Greedy decoding says "... named ▁Lily."; the
    plan's tokenizer is edited so that "▁Lily" is an added special token."""
    import shutil

    plan = tmp_path / "plan"
    shutil.copytree(stories_plan, plan)
    tok_file = plan / "tokenizer" / "tokenizer.json"
    tok = json.loads(tok_file.read_text())
    lily = tok["model"]["vocab"]["\u2581Lily"]
    tok["added_tokens"].append({"id": lily, "content": "\u2581Lily", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    tok_file.write_text(json.dumps(tok))
    args = ("reft", "run", plan, "--prompt", "Once upon a time", "--temperature", "0", "-n", "16")
    plain, special = run(*args), run(*args, "--special")
    assert plain.returncode == 0 and special.returncode == 0, plain.stderr + special.stderr
    assert special.stdout.startswith("Once upon a time, there was a little girl named Lily.")
    assert plain.stdout == special.stdout.replace(" Lily", "")
    assert "Lily" not in plain.stdout and plain.stdout.startswith("Once upon a time, there was a little girl named.")


def test_run_seed_is_reproducible(stories_plan):
    a = run("reft", "run", stories_plan, "-p", "Once upon a time", "--temperature", "1", "--seed", "7", "-n", "30")
    b = run("reft", "run", stories_plan, "-p", "Once upon a time", "--temperature", "1", "--seed", "7", "-n", "30")
    assert a.returncode == 0 and a.stdout == b.stdout


def test_chat_with_template_override(stories_plan, tmp_path):
    t = tmp_path / "t.jinja"
    t.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    p = run("reft", "run", stories_plan, "--chat", "--chat-template", t, "--temperature", "0", "-n", "8",
            stdin="Once upon a time\nThe dog\n")
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.strip().splitlines()) == 2


def test_perplexity_cli(stories_plan, stories_reference, tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(stories_reference["ppl_text"])
    p = run("reft", "perplexity", stories_plan, "-f", f)
    assert p.returncode == 0, p.stderr
    ppl = float(p.stdout.split()[1])
    assert abs(ppl - stories_reference["ppl"]) / stories_reference["ppl"] < 1e-4
