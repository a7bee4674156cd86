"""`reft train` / `reft export` end to end on the reference backend: a tiny model SFT-trained with
full, freeze and LoRA fine-tuning answers its training instructions through `reftc compile` +
`reft run --chat --temperature 0` (and stops); 10 + 10 steps with --resume equal 20 in one run,
byte for byte; every bad input is one `error:` line, a non-zero exit and no checkpoint. On a GGUF
with quantized weights (tests/qlora_tiny.py), on the cpu backend: LoRA keeps the base quantized
and writes an adapter that PEFT loads on the dequantized transformers model, with the logits of
reft's merged export; full fine-tuning trains float32 weights that start from the dequantized ones."""
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
        "lora dropout": ({"--lora-dropout": "1"}, ["--lora-dropout", "below 1"]),
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


@pytest.fixture(scope="module")
def quantized_gguf(tmp_path_factory):
    from qlora_tiny import STORIES_GGUF, write_tiny_gguf

    if not STORIES_GGUF.is_file():
        pytest.skip("shared/models/stories260K is absent")
    return write_tiny_gguf(tmp_path_factory.mktemp("qlora") / "tiny.gguf")


def test_qlora_on_a_gguf_writes_an_adapter_peft_loads(tiny, quantized_gguf, tmp_path):
    import numpy as np
    import torch
    from peft import PeftModel
    from qlora_tiny import hf_model

    from reft.compiler import compile_model
    from reft.runtime.engine import Engine
    from reft.runtime.train.checkpoint import read_weights

    _, data, template = tiny
    r = invoke(reft, "train", "--model", quantized_gguf, "--datasets", f"alpaca@{data}", "--checkpoint-dir",
               tmp_path / "ckpt", "--chat-template", template, "--batch-size", "2", "--backend", "cpu",
               *MEMORISE["lora"][0], "--lora-dropout", "0.05", "--max-steps", "6", "--learning-rate", "1e-2")
    assert r.exit_code == 0, r.output
    assert "15 frozen matrices stay quantized" in r.stderr        # 7 projections x 2 layers, the embedding
    final = tmp_path / "ckpt" / "checkpoint-6"
    adapter = read_weights(final / "adapter_model.safetensors")
    hf = hf_model(quantized_gguf)
    ids = [1, 5, 77, 300, 12, 9, 411, 2]
    with torch.no_grad():
        base = hf(torch.tensor([ids])).logits[0].numpy()
        model = PeftModel.from_pretrained(hf, final).eval()
        want = model(torch.tensor([ids])).logits[0].numpy()
    loaded = {k.replace(".default", ""): v.detach().numpy() for k, v in model.state_dict().items() if "lora_" in k}
    assert set(loaded) == set(adapter) and len(adapter) == 2 * 7 * 2
    for k, a in adapter.items():
        np.testing.assert_array_equal(loaded[k], a, err_msg=k)
    assert np.abs(want - base).max() > 1e-2                                       # the adapter matters
    r = invoke(reft, "export", final, "--merge", "-o", tmp_path / "merged")
    assert r.exit_code == 0, r.output
    plan = compile_model(tmp_path / "merged", tmp_path / "plan", backend="reference", progress=False)
    np.testing.assert_allclose(Engine.load(plan).logits(ids), want, rtol=1e-4, atol=1e-4)


def test_full_fine_tuning_of_a_gguf_trains_its_dequantized_weights(tiny, quantized_gguf, tmp_path):
    import numpy as np
    from qlora_tiny import dequantized_state

    from reft.runtime.train.checkpoint import read_weights

    _, data, template = tiny
    lr = 1e-3
    r = invoke(reft, "train", "--model", quantized_gguf, "--datasets", f"alpaca@{data}", "--checkpoint-dir",
               tmp_path / "ckpt", "--chat-template", template, "--batch-size", "2", "--backend", "cpu",
               "--fine-tuning-type", "full", "--max-steps", "1", "--learning-rate", str(lr))
    assert r.exit_code == 0, r.output
    assert "stay quantized" not in r.stderr
    got = read_weights(tmp_path / "ckpt" / "checkpoint-1" / "model.safetensors")
    start = dequantized_state(quantized_gguf)
    assert set(got) == set(start)
    for k, w in start.items():          # AdamW's first step moves a weight by at most the learning rate
        step = np.abs(got[k] - w)
        assert got[k].dtype == np.float32 and 0 < step.max() <= lr * 1.001, (k, step.max())
