"""LoRA training against PEFT: for tiny random-weight models of every family (tests/hf_tiny.py),
the `train_grad` entry of a LoRA train plan (the entry `reft train --fine-tuning-type lora
--grad-accumulation-steps 2` compiles) gives the loss and the gradient of every lora_A / lora_B
tensor that torch autograd gives through `peft.get_peft_model(transformers model)` (float64) within
1e-4 relative, for a pretraining block and an SFT batch whose prompt tokens carry no loss, with
rank 4, alpha 8 (scaling 2), dropout 0, on q_proj + v_proj and on every projection of the layer
(phi3: its fused qkv_proj / gate_up_proj stand in for the projections they hold).

Both sides start from the same random adapters, B nonzero too (a fresh adapter's B is zero, which
would zero every lora_A gradient): reft takes them as a resumed run does, through
`compile_train_plan(weights=...)`, and PEFT's `lora_A.default.weight` / `lora_B.default.weight`
are copied from the same arrays. Both are stored as nn.Linear weights, A [r, in] and B [out, r],
so no transpose; alpha / r is applied by each side itself. Every family runs on the reference
backend; the cpu backend (a C++ compile per plan) runs the families issue 14 names.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
from hf_tiny import TRAIN_CASES, make_model
from test_train_grads import batch, pretrain_batch, sft_batch, weighted_loss

from reft import backends
from reft.compiler import TrainPlanOptions, compile_train_plan
from reft.frontends.source import open_source
from reft.passes.add_lora import A_SUFFIX, B_SUFFIX, LoraConfig
from reft.runtime.plan import Plan

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

RANK, ALPHA = 4, 8.0
TARGETS = {"qv": ("q_proj", "v_proj"),
           "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",   # phi3's checkpoint names
         "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
PEFT_PREFIX = "base_model.model."
CPU_CASES = ("llama-gqa-llama3", "mistral-window", "qwen2-bias", "qwen3-qknorm")   # a C++ compile each
RUNS = [(case, which, backend) for case in TRAIN_CASES for which in sorted(TARGETS)
        for backend in ("reference", "cpu") if backend == "reference" or case in CPU_CASES]


@pytest.fixture(scope="module")
def model(request, tmp_path_factory):
    """(case name, its ModelSource, the transformers model)."""
    model_dir, hf = make_model(request.param, tmp_path_factory.mktemp(request.param) / "hf")
    return request.param, open_source(model_dir), hf


def targets_of(case: str, which: str) -> tuple[str, ...]:
    names = TARGETS[which]
    if case.startswith("phi3"):
        names = tuple(dict.fromkeys(FUSED.get(n, n) for n in names))
    return names


def adapters(hf, targets, seed: int = 0) -> dict[str, np.ndarray]:
    """Random nonzero A [r, in] and B [out, r] for every targeted linear, by reft's names."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in sorted(hf.named_parameters()):
        module = name[:-len(".weight")]
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in targets:
            n_out, n_in = p.shape
            out[module + A_SUFFIX] = (rng.uniform(-1, 1, (RANK, n_in)) / np.sqrt(n_in)).astype(np.float32)
            out[module + B_SUFFIX] = rng.uniform(-0.3, 0.3, (n_out, RANK)).astype(np.float32)
    return out


def reft_executable(source, targets, tensors, backend: str, out, dropout: float = 0.0, **options):
    """The LoRA train plan's executable, its adapters set to `tensors` (options: TrainPlanOptions')."""
    lora = LoraConfig(r=RANK, alpha=ALPHA, targets=targets, dropout=dropout)
    opts = TrainPlanOptions(backend=backend, lora=lora, accumulate=True, max_batch_tokens=64, threads=2, **options)
    plan = compile_train_plan(source, out, opts, weights=tensors)
    exe = backends.load(Plan(plan), threads=2)
    for k, v in exe.read_weights(sorted(tensors)).items():   # the plan trains from our adapters
        np.testing.assert_array_equal(v, tensors[k], err_msg=k)
    return exe


def peft_model(hf, targets, tensors):
    """get_peft_model on a copy of `hf` with the adapters set to `tensors`, in float64."""
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(targets),
                          bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(copy.deepcopy(hf), cfg)
    params = {reft_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    assert set(params) == set(tensors), sorted(set(params) ^ set(tensors))
    with torch.no_grad():
        for k, p in params.items():
            assert tuple(p.shape) == tensors[k].shape, k
            p.copy_(torch.from_numpy(tensors[k]))
    return model.double()


def reft_name(peft_name: str) -> str:
    """base_model.model.<module>.lora_A.default.weight -> <module>.lora_A.weight"""
    assert peft_name.startswith(PEFT_PREFIX), peft_name
    return peft_name[len(PEFT_PREFIX):].replace(".default.", ".")


def peft_loss_and_grads(model, seqs, labels):
    """Mean token loss over both sequences and every adapter tensor's gradient (reft's names)."""
    model.zero_grad()
    total = weighted_loss(model, seqs, labels)
    total.backward()
    return float(total.detach()), {reft_name(n): p.grad.numpy().copy()
                                   for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model, which, backend", RUNS, indirect=["model"])
def test_lora_loss_and_gradients_match_peft(model, which, backend, tmp_path):
    name, source, hf = model
    if not backends.get(backend).available():
        pytest.skip(f"the {backend} backend is not available")
    targets = targets_of(name, which)
    tensors = adapters(hf, targets)
    exe = reft_executable(source, targets, tensors, backend, tmp_path / "plan")
    ref = peft_model(hf, targets, tensors)
    for kind, make in (("pretrain", pretrain_batch), ("sft", sft_batch)):
        seqs, labels = make(np.random.default_rng(7))
        got = exe.run(batch(seqs, labels), entry="train_grad")
        want_loss, want = peft_loss_and_grads(ref, seqs, labels)
        loss = float(got["loss"])
        assert abs(loss - want_loss) <= 1e-4 * abs(want_loss), (name, kind, loss, want_loss)
        grads = {k[len("grad."):]: v for k, v in got.items() if k.startswith("grad.")}
        assert set(grads) == set(want), (name, sorted(set(grads) ^ set(want)))
        for k, g in grads.items():
            w = want[k]
            assert g.shape == w.shape and g.dtype == np.float32, (name, k)
            assert np.abs(w).max() > 0, (name, kind, k)
            err = np.abs(g - w).max() / np.abs(w).max()
            assert err < 1e-4, (name, kind, k, err)
