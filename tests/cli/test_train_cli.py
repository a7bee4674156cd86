"""`reft train` / `reft export` end to end on the reference backend: a tiny model SFT-trained with
full, freeze and LoRA fine-tuning answers its training instructions through `reftc compile` +
`reft run --chat --temperature 0` (and stops); 10 + 10 steps with --resume equal 20 in one run,
byte for byte; every bad input is one `error:` line, a non-zero exit and no checkpoint."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from train_tiny import EXAMPLES, sft_files, tiny_llama

from reft.cli.reft import main as reft
from reft.cli.reftc import main as reftc

# (fine-tuning options, steps, learning rate)
MEMORISE = {
    "full": (["--fine-tuning-type", "full"], 60, "1e-2"),
    "freeze": (["--fine-tuning-type", "freeze", "--freeze-trainable-layers", "1"], 120, "2e-2"),
    "lora": (["--fine-tuning-type", "lora", "--lora-rank", "8", "--lora-targets",
              "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"], 120, "2e-2"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    model, _ = tiny_llama(d / "model")
    data, template = sft_files(d / "data")
    return model, data, template


def invoke(cli, *args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


def train(tiny, ckpt, *extra, backend="reference"):
    model, data, template = tiny
    return invoke(reft, "train", "--model", model, "--datasets", f"alpaca@{data}", "--checkpoint-dir", ckpt,
                  "--chat-template", template, "--batch-size", "2", "--lr-scheduler-type", "constant",
                  "--backend", backend, *extra)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kind", MEMORISE)
def test_sft_memorises_through_compile_and_run(kind, backend, tiny, tmp_path):
    opts, steps, lr = MEMORISE[kind]
    r = train(tiny, tmp_path / "ckpt", *opts, "--max-steps", steps, "--learning-rate", lr, backend=backend)
    assert r.exit_code == 0, r.output
    final = tmp_path / "ckpt" / f"checkpoint-{steps}"
    assert f"final checkpoint {final}" in r.stdout
    model_dir = final
    if kind == "lora":
        r = invoke(reft, "export", final, "--merge", "-o", tmp_path / "merged")
        assert r.exit_code == 0, r.output
        model_dir = tmp_path / "merged"
    r = invoke(reftc, "compile", model_dir, "-o", tmp_path / "plan", "--backend", "reference")
    assert r.exit_code == 0, r.output
    for ex in EXAMPLES:   # the chat template the run trained with travels with the checkpoint
        r = invoke(reft, "run", tmp_path / "plan", "--chat", "--temperature", "0", "-n", "24",
                   input=ex["instruction"] + "\n")
        assert r.exit_code == 0, r.output
        assert r.stdout.strip() == ex["output"], (kind, r.stdout)   # and it stopped at </s>
    records = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records] == list(range(1, steps + 1))
    assert records[-1]["loss"] < records[0]["loss"] / 2
    assert set(records[0]) == {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed"}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_ten_plus_ten_resumed_steps_equal_twenty(backend, tiny, tmp_path):
    args = ["--fine-tuning-type", "full", "--learning-rate", "1e-3", "--grad-accumulation-steps", "2",
            "--batch-size", "1", "--weight-decay", "0.1"]
    assert train(tiny, tmp_path / "one", *args, "--max-steps", "20", backend=backend).exit_code == 0
    assert train(tiny, tmp_path / "two", *args, "--max-steps", "10", backend=backend).exit_code == 0
    r = train(tiny, tmp_path / "two", *args, "--max-steps", "20", "--resume", backend=backend)
    assert r.exit_code == 0, r.output
    assert "resuming from" in r.stderr and "at step 10" in r.stderr
    for f in ("model.safetensors", "optimizer.safetensors"):
        assert (tmp_path / "one/checkpoint-20" / f).read_bytes() == (tmp_path / "two/checkpoint-20" / f).read_bytes()
    steps = [json.loads(line)["step"] for line in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))


def one_error(r, *needles):
    assert r.exit_code != 0
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith(("data:", "2 training"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def no_checkpoint(d):
    assert not d.exists() or not list(d.glob("checkpoint-*"))


@pytest.mark.parametrize("case", ["missing dataset", "malformed line", "unknown lora target", "no trainable layers",
                                  "dir not writable", "text data for sft", "lora dropout"])
def test_bad_input_is_one_line(case, tiny, tmp_path):
    model, data, template = tiny
    ckpt = tmp_path / "ckpt"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(EXAMPLES[0]) + "\n{not json\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    extra, needles = {
        "missing dataset": ({"--datasets": f"alpaca@{tmp_path / 'nope.json'}"}, ["nope.json", "no such file"]),
        "malformed line": ({"--datasets": f"alpaca@{bad}"}, [f"{bad}:2"]),
        "unknown lora target": ({"--lora-targets": "q_proj,qkv"}, ["'qkv'", "not in the model"]),
        "no trainable layers": ({"--fine-tuning-type": "freeze", "--freeze-trainable-layers": "0"}, ["trains nothing"]),
        "dir not writable": ({"--checkpoint-dir": blocker / "ckpt"}, ["a_file"]),
        "text data for sft": ({"--datasets": f"text@{bad}"}, ["--stage sft"]),
        "lora dropout": ({"--lora-dropout": "0.1"}, ["dropout"]),
    }[case]
    opts = {"--datasets": f"alpaca@{data}", "--checkpoint-dir": ckpt, **extra}
    r = invoke(reft, "train", "--model", model, "--chat-template", template, "--backend", "reference", "--max-steps",
               "1", *[x for kv in opts.items() for x in kv])
    one_error(r, *needles)
    no_checkpoint(ckpt)


def test_resume_checks_model_and_run(tiny, tmp_path, copy_dir):
    model, data, template = tiny
    assert train(tiny, tmp_path / "ckpt", "--fine-tuning-type", "full", "--max-steps", "2",
                 "--learning-rate", "1e-3").exit_code == 0
    r = train(tiny, tmp_path / "ckpt", "--fine-tuning-type", "full", "--max-steps", "4", "--learning-rate", "2e-3",
              "--resume")
    one_error(r, "another run configuration")
    other = copy_dir(model, "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (other / "config.json").write_text(json.dumps(cfg))
    r = invoke(reft, "train", "--model", other, "--datasets", f"alpaca@{data}", "--checkpoint-dir", tmp_path / "ckpt",
               "--chat-template", template, "--batch-size", "2", "--lr-scheduler-type", "constant", "--backend",
               "reference", "--fine-tuning-type", "full", "--max-steps", "4", "--learning-rate", "1e-3",
               "--resume", tmp_path / "ckpt" / "checkpoint-2")
    one_error(r, "another model")
    r = train(tiny, tmp_path / "ckpt", "--fine-tuning-type", "full", "--max-steps", "4", "--learning-rate", "1e-3")
    one_error(r, "already holds checkpoints", "--resume")
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("checkpoint-*")) == ["checkpoint-2"]


def test_export_needs_merge_for_an_adapter(tiny, tmp_path):
    assert train(tiny, tmp_path / "ckpt", "--max-steps", "1").exit_code == 0
    r = invoke(reft, "export", tmp_path / "ckpt" / "checkpoint-1", "-o", tmp_path / "out")
    one_error(r, "LoRA adapter", "--merge")
    assert not (tmp_path / "out").exists()
