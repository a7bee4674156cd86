"""Checkpoints: a saved full model loads in transformers and in `reftc compile` with the same logits;
a LoRA adapter loads in PEFT and matches the merged weights; trainer state round-trips; saves are
atomic, pruned to save_total_limit, and resuming checks the checkpoint belongs to this run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hf_tiny import hf_logits, make_model

from reft.frontends.source import open_source
from reft.runtime.train.checkpoint import (CheckpointDir, CheckpointError, TrainerState, fingerprint,
                                           read_trainer_state, read_weights, restore_rng, rng_state, save_model,
                                           write_hf_model)
from reft.runtime.train.lora_adapter import LoraSpec, merge_lora, read_lora_adapter, write_lora_adapter

IDS = [1, 5, 77, 300, 12, 9, 411]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny tied-embedding Qwen2 (biases) and its torch model."""
    return make_model("qwen2-bias", tmp_path_factory.mktemp("qwen2"))


def trained_weights(src) -> dict[str, np.ndarray]:
    """The source weights as float32, changed a little (as training would)."""
    rng = np.random.default_rng(0)
    return {n: (np.asarray(src.weights[n], np.float32) + rng.normal(0, 0.01, src.weights[n].shape)).astype(np.float32)
            for n in src.weights}


def test_full_model_loads_in_transformers_and_reftc(tiny, tmp_path):
    import transformers

    from reft.compiler import compile_model
    from reft.ir.interpret import ReferenceExecutor
    from reft.runtime.plan import Plan

    folder, _ = tiny
    src = open_source(folder)
    weights = trained_weights(src)
    out = save_model(tmp_path / "export", src.config, weights, src.tokenizer)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert "lm_head.weight" not in read_weights(out / "model.safetensors")      # tied: not written
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    for n, p in model.named_parameters():
        np.testing.assert_array_equal(p.detach().numpy(), weights[n], err_msg=n)
    want = hf_logits(model, IDS)
    text = "Once upon a time"   # transformers picks the tokenizer class as it does for the source folder
    assert transformers.AutoTokenizer.from_pretrained(out).encode(text) == \
        transformers.AutoTokenizer.from_pretrained(folder).encode(text)
    plan = Plan(compile_model(out, tmp_path / "plan", backend="reference", progress=False, max_batch_tokens=16))
    n = len(IDS)
    feeds = {"input_ids": np.array(IDS, np.int32), "positions": np.arange(n, dtype=np.int32),
             "seq_ids": np.zeros(n, np.int32), "logit_rows": np.arange(n, dtype=np.int32),
             "page_table": np.array([[0]], np.int32)}
    kv = plan.kv
    for name in kv["inputs"]:
        feeds[name] = np.zeros((1, kv["page_size"], kv["kv_heads"], kv["head_dim"]), np.float32)
    got = ReferenceExecutor(plan.graph("forward"), plan.weights).run(feeds)["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_model_identity():
    from reft.runtime.train.checkpoint import model_identity

    cfg = {"model_type": "llama", "hidden_size": 8, "dtype": "bfloat16"}
    a = model_identity(cfg, {"w": (2, 3)})
    assert a == model_identity({**cfg, "dtype": "float32"}, {"w": (2, 3)})      # a float32 export is the same model
    assert a != model_identity({**cfg, "hidden_size": 16}, {"w": (2, 3)}) != model_identity(cfg, {"w": (3, 2)})


def test_config_drops_source_file_facts(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
           "quantization_config": {"quant_method": "gguf"}, "rope_scaling_by_layer_type": {}}
    write_hf_model(tmp_path, cfg, {"w": np.zeros((2, 2), np.float32)}, dtype="bfloat16")
    c = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in c and "rope_scaling_by_layer_type" not in c and c["dtype"] == "bfloat16"
    assert read_weights(tmp_path / "model.safetensors")["w"].dtype.name == "bfloat16"
    with pytest.raises(CheckpointError, match="model_type"):
        write_hf_model(tmp_path / "x", {"hidden_size": 8}, {})


def lora_tensors(model, spec: LoraSpec, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in spec.target_modules:
            o, i = mod.weight.shape
            out[name + ".lora_A.weight"] = rng.normal(0, 0.2, (spec.r, i)).astype(np.float32)
            out[name + ".lora_B.weight"] = rng.normal(0, 0.2, (o, spec.r)).astype(np.float32)
    return out


def test_lora_adapter_loads_in_peft(tiny, tmp_path):
    import peft
    import transformers

    folder, _ = tiny
    spec = LoraSpec(r=4, alpha=8.0, dropout=0.05, target_modules=("q_proj", "v_proj", "down_proj"),
                    base_model=str(folder))
    base = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tensors = lora_tensors(base, spec)
    write_lora_adapter(tmp_path / "adapter", spec, tensors)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    names = read_weights(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    sd = pm.state_dict()
    for n, a in tensors.items():
        np.testing.assert_array_equal(sd["base_model.model." + n.replace(".weight", ".default.weight")].numpy(), a)
    got = hf_logits(pm, IDS)
    merged_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    src = open_source(folder)
    merged = merge_lora({n: np.asarray(src.weights[n], np.float32) for n in src.weights}, spec, tensors)
    merged_model.load_state_dict({n: torch.tensor(a) for n, a in merged.items()}, strict=False)
    np.testing.assert_allclose(got, hf_logits(merged_model, IDS), rtol=1e-4, atol=1e-4)
    spec2, tensors2 = read_lora_adapter(tmp_path / "adapter")
    assert spec2.r == 4 and spec2.scale == 2.0 and set(spec2.target_modules) == set(spec.target_modules)
    assert all(np.array_equal(tensors2[n], a) for n, a in tensors.items())


def test_lora_adapter_checks(tmp_path):
    spec = LoraSpec(r=2, alpha=4, dropout=0.0, target_modules=("q_proj",))
    a = np.zeros((2, 8), np.float32)
    with pytest.raises(CheckpointError, match="lacks"):
        write_lora_adapter(tmp_path, spec, {"m.q_proj.lora_A.weight": a})
    with pytest.raises(CheckpointError, match=r"\[r, in\]"):
        write_lora_adapter(tmp_path, spec, {"m.q_proj.lora_A.weight": a, "m.q_proj.lora_B.weight": a})
    with pytest.raises(CheckpointError, match="not one of the target modules"):
        write_lora_adapter(tmp_path, spec, {"m.k_proj.lora_A.weight": a, "m.k_proj.lora_B.weight": a.T.copy()})


def state(step, seed=0):
    rng = np.random.default_rng(seed)
    rng.random(3)
    return TrainerState(step=step, identity={"model": "m1", "run": fingerprint({"lr": 1e-3})},
                        scheduler={"kind": "cosine", "peak_lr": 1e-3}, data={"epoch": 1, "position": 4},
                        rng={"numpy": rng_state(rng)}, metrics={"loss": 1.5},
                        optimizer={"optim.m.w": np.full((2, 3), step, np.float32),
                                   "optim.v.w": np.ones((2, 3), np.float32)})


def test_checkpoint_dir_saves_prunes_and_resumes(tmp_path):
    ck = CheckpointDir(tmp_path / "ckpt", save_total_limit=2)
    for step in (10, 20, 30):
        ck.save(state(step), lambda d, s=step: (d / "model.safetensors").write_bytes(b"x" * s))
    assert [p.name for p in ck.checkpoints()] == ["checkpoint-20", "checkpoint-30"]
    s = read_trainer_state(ck.latest(), expect={"model": "m1", "run": fingerprint({"lr": 1e-3})})
    want = state(30)
    assert s.step == 30 and s.data == want.data and s.scheduler == want.scheduler and s.metrics == want.metrics
    assert np.array_equal(s.optimizer["optim.m.w"], want.optimizer["optim.m.w"])
    ref = np.random.default_rng(0)
    ref.random(3)
    assert np.array_equal(restore_rng(s.rng["numpy"]).random(5), ref.random(5))
    with pytest.raises(CheckpointError, match="another run"):
        read_trainer_state(ck.latest(), expect={"model": "m1", "run": fingerprint({"lr": 2e-3})})


def test_interrupted_save_keeps_the_last_good_checkpoint(tmp_path):
    ck = CheckpointDir(tmp_path, save_total_limit=1)
    ck.save(state(1), lambda d: (d / "a").write_text("good"))

    def boom(d):
        (d / "a").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ck.save(state(2), boom)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]
    assert (ck.latest() / "a").read_text() == "good"
    (tmp_path / "checkpoint-5").mkdir()                      # incomplete: no trainer_state.json
    assert ck.latest().name == "checkpoint-1"
    with pytest.raises(CheckpointError, match="not a complete reft checkpoint"):
        read_trainer_state(tmp_path / "checkpoint-5")


def test_unwritable_checkpoint_dir(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="not writable"):
        CheckpointDir(tmp_path / "file" / "ckpt")
