"""LoRA dropout (reft/ir/ops/dropout.py, passes/add_lora.py): the mask is the documented counter-based
function of (key, stream, element) — checked against this file's own pure-Python port of it, which
is the reference here — on the reference and cpu backends bit for bit, whatever the thread count;
it keeps a fraction 1 - p; a LoRA train plan's loss and adapter gradients with dropout match torch
autograd through PEFT whose lora_dropout modules apply the same masks; the eval entry has no
dropout; gradient checkpointing recomputes the same masks. (Resuming with dropout on is in
test_trainer.py.)"""
from __future__ import annotations

import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hf_tiny import make_model

sys.path.insert(0, str(Path(__file__).parents[2] / "models"))
from test_lora_peft_grads import adapters, peft_loss_and_grads, peft_model, reft_executable  # noqa: E402
from test_train_grads import batch, pretrain_batch, sft_batch  # noqa: E402

from reft import backends  # noqa: E402
from reft.compiler import TrainPlanOptions, compile_train_plan  # noqa: E402
from reft.frontends.source import open_source  # noqa: E402
from reft.ir import GraphBuilder  # noqa: E402
from reft.ir.interpret import ReferenceExecutor  # noqa: E402
from reft.ir.ops.dropout import keep_mask  # noqa: E402
from reft.passes.add_lora import DROPOUT_KEY, LoraConfig  # noqa: E402
from reft.runtime.plan import Plan  # noqa: E402
from reft.runtime.train.trainer import dropout_key  # noqa: E402

torch = pytest.importorskip("torch")
U64 = 2**64 - 1
P = 0.3
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- the port: SplitMix64 from mix64(key ^ mix64(stream)), element i takes output i + 1 ----------------
def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
    return z ^ (z >> 31)


def port_keep(key: int, stream: int, n: int, p: float) -> np.ndarray:
    base = _mix((key & U64) ^ _mix(stream))
    cut = round(p * 2**24)
    return np.array([(_mix((base + (i + 1) * 0x9E3779B97F4A7C15) & U64) >> 40) >= cut for i in range(n)])


def port_dropout(x: np.ndarray, key: int, stream: int, p: float) -> np.ndarray:
    keep = port_keep(key, stream, x.size, p).reshape(x.shape)
    return np.where(keep, x * np.float32(1 / (1 - p)), np.float32(0)).astype(np.float32)


# -- the op ----------------------------------------------------------------------------------------
def dropout_graph(cases):
    """One graph: dropout(x_c) for each case (shape, p, stream)."""
    b = GraphBuilder("drop")
    key = b.input("key", (), "int64")
    for c, (shape, p, stream) in enumerate(cases):
        x = b.input(f"x{c}", shape, "float32")
        b.output(f"y{c}", b.dropout(x, key, p=p, stream=stream))
    return b.graph


CASES = [(("T", 7), 0.1, 1), (("T", 64), 0.5, 2**32 - 1), (("T", 3, 5), 0.9, 12345), ((129,), P, 0),
         (("T", 16), 0.0, 5)]


def feeds(rng, T, key):
    out = {"key": np.array(key, np.int64)}
    for c, (shape, _, _) in enumerate(CASES):
        out[f"x{c}"] = rng.standard_normal([T if d == "T" else d for d in shape]).astype(np.float32)
    return out


def test_reference_is_the_documented_function():
    rng = np.random.default_rng(0)
    graph = dropout_graph(CASES)
    for key in (0, -1, 2**62 + 12345, int(dropout_key(42, 3, 1))):
        f = feeds(rng, 11, key)
        got = ReferenceExecutor(graph, {}).run(f)
        for c, (_, p, stream) in enumerate(CASES):
            np.testing.assert_array_equal(got[f"y{c}"], port_dropout(f[f"x{c}"], key, stream, p))


@pytest.mark.skipif(not backends.get("cpu").available(), reason="no C++ compiler")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_masks_equal_the_reference_bit_for_bit(threads, tmp_path):
    from reft.backends.cpu import compile_graph

    graph = dropout_graph(CASES)
    exe = compile_graph({"drop": graph}, {}, tmp_path, max_tokens=64, threads=threads)
    rng = np.random.default_rng(1)
    for T, key in ((1, 7), (13, -5), (64, int(dropout_key(0, 9, 0)))):
        f = feeds(rng, T, key)
        want = ReferenceExecutor(graph, {}).run(f)
        got = exe.run(f, entry="drop")
        for k, w in want.items():
            np.testing.assert_array_equal(got[k], w, err_msg=f"{k} T={T}")


def test_kept_fraction_and_independence():
    n = 1_000_000
    sigma = np.sqrt(P * (1 - P) / n)
    a, b, c = keep_mask(11, 1, n, P), keep_mask(11, 2, n, P), keep_mask(12, 1, n, P)
    np.testing.assert_array_equal(a[:2000], port_keep(11, 1, 2000, P))
    for m in (a, b, c):
        assert abs(m.mean() - (1 - P)) < 5 * sigma
    agree = P * P + (1 - P) * (1 - P)        # two independent masks agree this often
    for other in (b, c):                      # another stream (module) or another key (micro-batch)
        assert abs(np.mean(a == other) - agree) < 5 * np.sqrt(agree * (1 - agree) / n)
    assert abs(keep_mask(3, 4, n, 0.05).mean() - 0.95) < 5 * np.sqrt(0.05 * 0.95 / n)
    assert keep_mask(3, 4, 1000, 0.0).all()


def test_dropout_key_depends_on_seed_step_and_micro_batch():
    keys = {int(dropout_key(s, t, m)) for s in (0, 42) for t in (0, 1, 7) for m in (0, 1)}
    assert len(keys) == 12
    assert int(dropout_key(42, 7, 1)) == int(dropout_key(42, 7, 1))
    assert dropout_key(-3, 0, 0).dtype == np.int64 and dropout_key(-3, 0, 0).shape == ()


# -- LoRA with dropout against PEFT ------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d, hf = make_model("llama-gqa-llama3", tmp_path_factory.mktemp("drop") / "hf")
    return open_source(d), hf


class MaskDropout(torch.nn.Module):
    """PEFT's lora_dropout replaced by reft's mask for one module: each call (one sequence of the
    packed batch, as test_train_grads.weighted_loss runs them) takes the next rows."""

    def __init__(self, mask: np.ndarray):
        super().__init__()
        self.mask, self.at = torch.from_numpy(mask.astype(np.float64)), 0

    def forward(self, x):
        n = x.shape[-2]
        m = self.mask[self.at:self.at + n]
        self.at += n
        return x * m


def install_masks(peft, key: int, tokens: int) -> int:
    """Give every adapted module of the PEFT model reft's mask (keep / (1 - p)) for `tokens` rows."""
    count = 0
    for name, mod in peft.named_modules():
        if hasattr(mod, "lora_dropout") and "default" in mod.lora_dropout:
            module = name.removeprefix("base_model.model.")
            n_in = mod.in_features
            keep = port_keep(key, zlib.crc32(module.encode()), tokens * n_in, P).reshape(tokens, n_in)
            mod.lora_dropout["default"] = MaskDropout(keep / (1 - P))
            count += 1
    return count


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_lora_dropout_gradients_match_peft_with_the_same_masks(model, backend, tmp_path):
    source, hf = model
    if not backends.get(backend).available():
        pytest.skip(f"the {backend} backend is not available")
    tensors = adapters(hf, TARGETS)
    exe = reft_executable(source, TARGETS, tensors, backend, tmp_path / "plan", dropout=P)
    ref = peft_model(hf, TARGETS, tensors)
    for kind, make, key in (("pretrain", pretrain_batch, 17), ("sft", sft_batch, -2**40)):
        seqs, labels = make(np.random.default_rng(7))
        f = batch(seqs, labels)
        got = exe.run({**f, DROPOUT_KEY: np.array(key, np.int64)}, entry="train_grad")
        assert install_masks(ref, key, len(f["input_ids"])) == 2 * len(TARGETS)
        want_loss, want = peft_loss_and_grads(ref, seqs, labels)
        assert abs(float(got["loss"]) - want_loss) <= 1e-4 * abs(want_loss), (kind, float(got["loss"]), want_loss)
        without = exe.run({**f, DROPOUT_KEY: np.array(key + 1, np.int64)}, entry="train_grad")
        assert abs(float(without["loss"]) - want_loss) > 1e-3 * abs(want_loss)     # the masks matter
        for k, g in got.items():
            if k.startswith("grad."):
                w = want[k[len("grad."):]]
                err = np.abs(g - w).max() / np.abs(w).max()
                assert err < 1e-4, (backend, kind, k, err)


def test_eval_has_no_dropout_and_checkpointing_redraws_the_same_masks(model, tmp_path):
    source, hf = model
    tensors = adapters(hf, TARGETS)
    lora = LoraConfig(r=4, alpha=8.0, targets=TARGETS, dropout=P)
    runs = {}
    for gc in (False, True):
        opts = TrainPlanOptions(backend="reference", lora=lora, accumulate=True, eval=True, max_batch_tokens=64,
                                gradient_checkpointing=gc)
        plan = Plan(compile_train_plan(source, tmp_path / f"plan{gc}", opts, weights=tensors))
        train, ev = plan.graph("train_grad"), plan.graph("eval_loss")     # parsed back from the plan's .ir
        assert train.op_counts()["dropout"] > 2 * len(TARGETS)            # a forward one per module, and backward
        assert DROPOUT_KEY in {n.name for n in train.inputs()}
        assert "dropout" not in ev.op_counts() and DROPOUT_KEY not in {n.name for n in ev.inputs()}
        f = {**batch(*sft_batch(np.random.default_rng(3))), DROPOUT_KEY: np.array(99, np.int64)}
        runs[gc] = backends.load(plan).run(f, entry="train_grad")
    for k, g in runs[False].items():
        np.testing.assert_array_equal(runs[True][k], g, err_msg=k)
