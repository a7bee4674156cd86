"""The backward and loss ops' references against torch autograd (float64), the oracle of their
future kernels: each op is the gradient of a forward computation written in torch."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import heads, rand, token_batch

from reft.ir import ops
from reft.ir.ops.loss import CHUNK
from reft.ir.ops.nn import rope_inv_freq

VALUES = settings(max_examples=20, deadline=None)
seeds = st.integers(0, 2**32 - 1)


def ref(op, *xs, **attrs):
    d = ops.get(op)
    return d.ref(list(xs), d.full_attrs(attrs))


def t64(a, grad=False):
    return torch.tensor(np.asarray(a, np.float64), requires_grad=grad)


def vjp(fn, inputs, dy):
    """Gradients of sum(fn(*inputs) * dy) w.r.t. inputs (numpy in, float64 torch)."""
    ts = [t64(x, True) for x in inputs]
    (fn(*ts) * t64(dy)).sum().backward()
    return [x.grad.numpy() for x in ts]


def close(got, want, tol=1e-5, floor=1e-3):
    """Within tol of the largest expected magnitude (or of `floor`, where the gradient itself is a
    small difference of O(1) terms)."""
    scale = max(float(np.abs(want).max()), floor)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)


@VALUES
@given(seeds, st.integers(1, 6), st.integers(1, 5), st.integers(1, 7))
def test_linear_grads(seed, T, K, N):
    rng = np.random.default_rng(seed)
    x, w, dy = rand(rng, (T, K), "float32"), rand(rng, (N, K), "float32"), rand(rng, (T, N), "float32")
    gx, gw = vjp(lambda a, b: a @ b.T, [x, w], dy)
    close(ref("linear_grad_input", dy, w)[0], gx)
    close(ref("linear_grad_weight", dy, x)[0], gw)
    close(ref("sum_rows", dy)[0], dy.astype(np.float64).sum(0))


@VALUES
@given(seeds, st.integers(1, 6), st.integers(1, 16), st.sampled_from([1e-6, 1e-5, 0.1]), st.booleans())
def test_rms_norm_grad(seed, T, D, eps, heads3):
    rng = np.random.default_rng(seed)
    shape = (T, 2, D) if heads3 else (T, D)
    x, w, dy = rand(rng, shape, "float32"), rand(rng, (D,), "float32"), rand(rng, shape, "float32")
    gx, gw = vjp(lambda a, b: F.rms_norm(a, (D,), b, eps=eps), [x, w], dy)
    dx, dw = ref("rms_norm_grad", dy, x, w, eps=eps)
    close(dx, gx, floor=1.0)           # D = 1: dx = g r eps / (x^2 + eps), a cancellation of O(1) terms
    close(dw, gw)


ROPE = {"default": {}, "linear": {"factor": 4.0},
        "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position": 64}}


@pytest.mark.parametrize("kind", sorted(ROPE))
@VALUES
@given(seed=seeds, T=st.integers(1, 6), H=st.integers(1, 3), half=st.integers(1, 8), extra=st.sampled_from([0, 3]))
def test_rope_grad_is_the_inverse_rotation(kind, seed, T, H, half, extra):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    r = 2 * half
    a = {"theta": 10000.0, "rotary_dim": r, "scaling": kind, **ROPE[kind]}
    rng = np.random.default_rng(seed)
    x, dy = rand(rng, (T, H, r + extra), "float32"), rand(rng, (T, H, r + extra), "float32")
    pos = rng.integers(0, 300, size=T).astype(np.int32)
    inv = torch.from_numpy(rope_inv_freq(ops.get("rope").full_attrs(a)).astype(np.float64))
    emb = torch.cat([torch.from_numpy(pos.astype(np.float64))[:, None] * inv[None]] * 2, -1)

    def rope(v):                                                           # (T, H, D), transformers' rotation
        rot = apply_rotary_pos_emb(v[..., :r].transpose(0, 1)[None], v[..., :r].transpose(0, 1)[None],
                                   emb.cos()[None], emb.sin()[None])[0][0].transpose(0, 1)
        return torch.cat([rot, v[..., r:]], -1)

    (gx,) = vjp(rope, [x], dy)
    (dx,) = ref("rope_grad", dy, pos, **a)
    close(dx, gx, 1e-4)                              # float32 angles of positions up to 300
    (back,) = ref("rope_grad", ref("rope", x, pos, **a)[0], pos, **a)
    close(back, x, 1e-5)


@pytest.mark.parametrize("op,fn", [("silu_grad", F.silu), ("gelu_tanh_grad", lambda v: F.gelu(v, approximate="tanh"))])
@VALUES
@given(seed=seeds)
def test_activation_grads(op, fn, seed):
    rng = np.random.default_rng(seed)
    x, dy = rand(rng, (5, 7), "float32", -8, 8), rand(rng, (5, 7), "float32")
    (gx,) = vjp(fn, [x], dy)
    close(ref(op, dy, x)[0], gx)


@VALUES
@given(seed=seeds, act=st.sampled_from(["silu", "gelu_tanh"]))
def test_softmax_and_glu_grads(seed, act):
    rng = np.random.default_rng(seed)
    x, dy = rand(rng, (4, 6), "float32", -4, 4), rand(rng, (4, 6), "float32")
    (gx,) = vjp(lambda v: torch.softmax(v, -1), [x], dy)
    (y,) = ref("softmax", x)
    close(ref("softmax_grad", dy, y)[0], gx)
    fn = F.silu if act == "silu" else (lambda v: F.gelu(v, approximate="tanh"))
    dh = dy[:, :3]
    (gy,) = vjp(lambda v: fn(v[:, :3]) * v[:, 3:], [x], dh)
    close(ref("glu_grad", dh, x, act=act)[0], gy)


@VALUES
@given(seed=seeds, N=st.integers(1, 5), R=st.integers(1, 8))
def test_scatter_rows_adds_repeated_rows(seed, N, R):
    rng = np.random.default_rng(seed)
    base, src = rand(rng, (N, 3), "float32"), rand(rng, (R, 3), "float32")
    rows = rng.integers(0, N, size=R).astype(np.int32)
    want = torch.from_numpy(base.astype(np.float64)).index_add(0, torch.from_numpy(rows).long(),
                                                                 torch.from_numpy(src.astype(np.float64)))
    close(ref("scatter_rows", base, rows, src)[0], want.numpy())
    assert not ref("zeros_like", base)[0].any()


def _attention_torch(q, k, v, pos, sid, scale, window):
    H, Hkv = q.shape[1], k.shape[1]
    mask = (sid[None, :] == sid[:, None]) & (pos[None, :] <= pos[:, None])
    if window:
        mask &= (pos[:, None] - pos[None, :]) < window
    kk = k.transpose(0, 1).repeat_interleave(H // Hkv, 0)
    vv = v.transpose(0, 1).repeat_interleave(H // Hkv, 0)
    s = (q.transpose(0, 1) @ kk.transpose(1, 2)) * scale
    s = s.masked_fill(~torch.from_numpy(mask), -math.inf)
    return (torch.softmax(s, -1) @ vv).transpose(0, 1)


@VALUES
@given(seed=seeds, hd=heads(), batch=token_batch(max_past=0, max_new=6), window=st.sampled_from([0, 0, 1, 2, 3]))
def test_causal_attention_grad(seed, hd, batch, window):
    H, Hkv, D = hd
    _, sid, pos = batch
    rng = np.random.default_rng(seed)
    T = len(sid)
    q, k, v = rand(rng, (T, H, D), "float32"), rand(rng, (T, Hkv, D), "float32"), rand(rng, (T, Hkv, D), "float32")
    dout = rand(rng, (T, H, D), "float32")
    a = {"scale": 1.0 / math.sqrt(D), "sliding_window": window}
    want = vjp(lambda *t: _attention_torch(*t, pos, sid, a["scale"], window), [q, k, v], dout)
    (out,) = ref("causal_attention", q, k, v, pos, sid, **a)
    got = ref("causal_attention_grad", dout, q, k, v, out, pos, sid, **a)
    for g, w in zip(got, want):
        assert g.dtype == np.float32
        close(g, w, floor=1.0)         # a row attending only to itself has dq = 0 up to rounding


def _ce_torch(x, head, targets, scale):
    return F.cross_entropy(x @ head.T, torch.from_numpy(targets).long(), ignore_index=-100, reduction="sum") * scale


@pytest.mark.parametrize("T", [7, CHUNK + 37])                      # one chunk, and several
@settings(max_examples=6, deadline=None)
@given(seed=seeds, dloss=st.sampled_from([None, 1.0, -0.5]))
def test_linear_cross_entropy_and_grad(T, seed, dloss):
    rng = np.random.default_rng(seed)
    D, V, scale = 8, 50, np.float32(0.03)
    x, head = rand(rng, (T, D), "float32", -2, 2), rand(rng, (V, D), "float32", -1, 1)
    targets = rng.integers(0, V, size=T).astype(np.int32)
    targets[rng.random(T) < 0.3] = -100
    xt, ht = t64(x, True), t64(head, True)
    want = _ce_torch(xt, ht, targets, float(scale))
    (want * (1.0 if dloss is None else dloss)).backward()
    loss, lse = ref("linear_cross_entropy", x, head, targets, scale)
    assert loss.shape == () and lse.shape == (T,)
    close(loss, want.detach().numpy())
    z = x.astype(np.float64) @ head.T.astype(np.float64)
    full = np.log(np.exp(z).sum(-1))
    close(lse, np.where(targets != -100, full, 0.0))                  # ignored rows: 0
    extra = [] if dloss is None else [np.array(dloss, np.float32)]
    dx, dhead = ref("linear_cross_entropy_grad", x, head, targets, scale, lse, *extra)
    close(dx, xt.grad.numpy())
    close(dhead, ht.grad.numpy())
    assert not dx[targets == -100].any()


def test_cross_entropy_target_out_of_range_is_an_error():
    x, head = np.zeros((2, 3), np.float32), np.zeros((4, 3), np.float32)
    with pytest.raises(IndexError):
        ref("linear_cross_entropy", x, head, np.array([1, 4], np.int32), np.float32(1.0))
