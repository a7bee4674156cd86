"""The training graph against torch autograd through transformers, on tiny random-weight models of
every family (tests/hf_tiny.py): the reference interpreter's loss and the gradient of every
parameter match Hugging Face's (its own label shifting and -100 masking, run in float64) within
1e-4 relative, for a pretraining block (two sequences packed into one row batch) and for an SFT
batch whose prompt tokens carry no loss.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
from hf_tiny import TRAIN_CASES, make_model

from reft.frontends.architectures import find_family
from reft.frontends.config import load_hf_config
from reft.ir.interpret import ReferenceExecutor
from reft.passes.differentiate import build_train_graph

torch = pytest.importorskip("torch")

IGNORE = -100


@pytest.fixture(scope="module", params=TRAIN_CASES)
def case(request, tmp_path_factory):
    hf, graph, weights = train_model(request.param, tmp_path_factory)
    return request.param, hf, ReferenceExecutor(graph, weights)


def train_model(name: str, tmp_path_factory):
    """A tiny random model of case `name`: (transformers model, its train graph, its weights)."""
    model_dir, hf = make_model(name, tmp_path_factory.mktemp(name) / "hf")
    hf_cfg = load_hf_config(model_dir)
    family = find_family(hf_cfg.get("architectures"))
    graph = build_train_graph(family, family.Config.from_hf(hf_cfg))
    weights = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    return hf, graph, weights


def batch(seqs: list[list[int]], labels: list[list[int]]) -> dict[str, np.ndarray]:
    """Packed feeds: row t's target is the next label of its sequence (-100 at a sequence's end)."""
    targets = [np.append(np.asarray(lab[1:]), IGNORE) for lab in labels]
    n = sum(int(np.sum(t != IGNORE)) for t in targets)
    return {"input_ids": np.concatenate(seqs).astype(np.int32),
            "positions": np.concatenate([np.arange(len(s)) for s in seqs]).astype(np.int32),
            "seq_ids": np.concatenate([np.full(len(s), i) for i, s in enumerate(seqs)]).astype(np.int32),
            "targets": np.concatenate(targets).astype(np.int32),
            "loss_scale": np.array(1.0 / n, np.float32)}


def weighted_loss(model, seqs, labels):
    """Mean token loss over the sequences: HF's per-sequence means weighted by their target counts."""
    counts = [sum(1 for x in lab[1:] if x != IGNORE) for lab in labels]
    total = 0
    for s, lab, c in zip(seqs, labels, counts):
        out = model(input_ids=torch.tensor([s]), labels=torch.tensor([lab]))
        total = total + out.loss * (c / sum(counts))
    return total


def hf_loss_and_grads(hf, seqs, labels):
    """Mean token loss over both sequences and every parameter's gradient, in float64."""
    model = copy.deepcopy(hf).double()
    total = weighted_loss(model, seqs, labels)
    total.backward()
    return float(total.detach()), {k: p.grad.numpy() for k, p in model.named_parameters()}


def tokens(rng, n):
    return [1] + rng.integers(3, 512, n - 1).tolist()


def pretrain_batch(rng):
    seqs = [tokens(rng, 21), tokens(rng, 16)]          # longer than mistral's window of 12
    return seqs, [list(s) for s in seqs]


def sft_batch(rng):
    seqs = [tokens(rng, 19), tokens(rng, 14)]
    prompts = [11, 6]
    return seqs, [[IGNORE] * p + s[p:] for s, p in zip(seqs, prompts)]


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_loss_and_every_gradient_match_transformers(case, kind):
    name, hf, executor = case
    rng = np.random.default_rng(7)
    seqs, labels = (pretrain_batch if kind == "pretrain" else sft_batch)(rng)
    got = executor.run(batch(seqs, labels))
    want_loss, want = hf_loss_and_grads(hf, seqs, labels)
    assert abs(float(got["loss"]) - want_loss) <= 1e-4 * abs(want_loss), (name, got["loss"], want_loss)
    grads = {k[len("grad."):]: v for k, v in got.items() if k.startswith("grad.")}
    assert set(grads) == set(want), (name, sorted(set(grads) ^ set(want)))
    for k, g in grads.items():
        w = want[k]
        assert g.shape == w.shape and g.dtype == np.float32, (name, k)
        assert np.abs(w).max() > 0, (name, k)
        err = np.abs(g - w).max() / np.abs(w).max()
        assert err < 1e-4, (name, kind, k, err)
