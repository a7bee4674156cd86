"""The trainer on the reference backend with a tiny Llama: an interrupted run resumed from its last
checkpoint ends byte-identical to an uninterrupted one (LoRA, grad accumulation, warmup + cosine;
with LoRA dropout also on the cpu backend);
a LoRA adapter loads in PEFT on the transformers model with the logits of reft's merged export;
freeze trains only the chosen layers; gradient checkpointing changes no bit; pretraining
stories260K evaluates on the held-out blocks and lowers the loss."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from train_tiny import sft_files, tiny_llama

from reft import backends
from reft.runtime.train.checkpoint import read_weights
from reft.runtime.train.options import TrainArgs
from reft.runtime.train.trainer import Trainer

IDS = [1, 5, 77, 300, 12, 9, 411, 2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    model, hf = tiny_llama(d / "model")
    data, template = sft_files(d / "data")
    return model, hf, data, template


def args(tiny, ckpt, **kw) -> TrainArgs:
    model, _, data, template = tiny
    base = dict(model=str(model), datasets=(f"alpaca@{data}",), checkpoint_dir=str(ckpt), chat_template=str(template),
                batch_size=1, learning_rate=1e-2, backend="reference")
    return TrainArgs(**{**base, **kw})


def run(a: TrainArgs):
    return Trainer(a).train()


@pytest.mark.parametrize("backend, dropout", [("reference", 0.0), ("reference", 0.2), ("cpu", 0.2)])
def test_interrupted_run_resumes_bit_for_bit(tiny, tmp_path, backend, dropout):
    """With LoRA dropout too: each micro-batch's masks are redrawn from (seed, step, micro-batch)."""
    if not backends.get(backend).available():
        pytest.skip(f"the {backend} backend is not available")
    a = args(tiny, tmp_path / "ckpt", fine_tuning_type="lora", lora_targets=("q_proj", "v_proj", "down_proj"),
             grad_accumulation_steps=2, lr_scheduler_type="cosine", warmup_steps=2, max_steps=8, save_every=4,
             weight_decay=0.1, lora_dropout=dropout, backend=backend)
    final = run(a)
    assert final.name == "checkpoint-8"
    want = {f: (final / f).read_bytes() for f in ("adapter_model.safetensors", "optimizer.safetensors")}
    shutil.rmtree(final)                                   # as if the run had stopped after step 4
    resumed = Trainer(TrainArgs(**{**a.__dict__, "resume": "latest"}))
    assert resumed.step == 4
    final = resumed.train()
    assert {f: (final / f).read_bytes() for f in want} == want
    steps = [json.loads(line)["step"] for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_lora_adapter_loads_in_peft_like_the_merged_export(tiny, tmp_path):
    import peft
    import torch

    from reft.cli.reft import main as reft
    from reft.compiler import compile_model
    from reft.ir.interpret import ReferenceExecutor
    from reft.runtime.plan import Plan

    _, hf, _, _ = tiny
    final = run(args(tiny, tmp_path / "ckpt", fine_tuning_type="lora", lora_rank=4, lora_alpha=8.0,
                     lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                     max_steps=5))
    adapter = read_weights(final / "adapter_model.safetensors")
    assert any(np.abs(a).max() > 1e-3 for n, a in adapter.items() if "lora_B" in n)    # training moved B
    with torch.no_grad():
        base = hf(torch.tensor([IDS])).logits[0].numpy()
        model = peft.PeftModel.from_pretrained(hf, final).eval()
        want = model(torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(want - base).max() > 1e-2                                           # the adapter matters
    r = CliRunner().invoke(reft, ["export", str(final), "--merge", "-o", str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    plan = Plan(compile_model(tmp_path / "merged", tmp_path / "plan", backend="reference", progress=False,
                              max_batch_tokens=16))
    n = len(IDS)
    feeds = {"input_ids": np.array(IDS, np.int32), "positions": np.arange(n, dtype=np.int32),
             "seq_ids": np.zeros(n, np.int32), "logit_rows": np.arange(n, dtype=np.int32),
             "page_table": np.array([[0]], np.int32)}
    for name in plan.kv["inputs"]:
        feeds[name] = np.zeros((1, plan.kv["page_size"], plan.kv["kv_heads"], plan.kv["head_dim"]), np.float32)
    got = ReferenceExecutor(plan.graph("forward"), plan.weights).run(feeds)["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_freeze_trains_only_the_chosen_layers(tiny, tmp_path):
    from reft.frontends.safetensors import open_weights

    model = tiny[0]
    final = run(args(tiny, tmp_path / "ckpt", fine_tuning_type="freeze", freeze_trainable_layers=-1, max_steps=2))
    got, src = read_weights(final / "model.safetensors"), open_weights(model)
    assert set(got) == set(src)
    for name in src:
        same = np.array_equal(got[name], np.asarray(src[name], np.float32))
        assert same == (not name.startswith("model.layers.0.")), name


def test_gradient_checkpointing_changes_no_bit(tiny, tmp_path):
    a = args(tiny, tmp_path / "plain", fine_tuning_type="full", max_steps=2)
    b = TrainArgs(**{**a.__dict__, "checkpoint_dir": str(tmp_path / "gc"), "gradient_checkpointing": True})
    assert (run(a) / "model.safetensors").read_bytes() == (run(b) / "model.safetensors").read_bytes()


def test_pretraining_evaluates_and_lowers_the_loss(stories_dir, tmp_path):
    text = tmp_path / "stories.txt"
    text.write_text(" ".join(["Lily went to the park with her mom. She saw a big red ball and played with it."] * 12))
    a = TrainArgs(model=str(stories_dir), datasets=(f"text@{text}",), checkpoint_dir=str(tmp_path / "ckpt"),
                  stage="pretrain", fine_tuning_type="full", block_size=48, batch_size=2, learning_rate=5e-3,
                  lr_scheduler_type="constant", max_steps=8, eval_split=1, eval_every=4, backend="reference")
    run(a)
    records = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"]
