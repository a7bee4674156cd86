"""The op features Gemma 2/3 and Phi-3 brought against transformers' own modules: RMSNorm with (1 + w),
attention-score and final-logit soft-capping, longrope's short/long factors and attention factor
(with each token's seq_extent), and the embedding scale."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reft.ir import ops
from strategies import rand, token_batch

VALUES = settings(max_examples=25, deadline=None)


def ref(op, *xs, **attrs):
    d = ops.get(op)
    out = d.ref(list(xs), d.full_attrs(attrs))
    return out[0] if len(out) == 1 else out


@VALUES
@given(seed=st.integers(0, 2**32 - 1), T=st.integers(1, 5), D=st.integers(1, 16))
def test_rms_norm_offset_vs_gemma(seed, T, D):
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    rng = np.random.default_rng(seed)
    x, w = rand(rng, (T, D), "float32"), rand(rng, (D,), "float32", -0.5, 0.5)
    m = Gemma2RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(w))
        want = m(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ref("rms_norm", x, w, eps=1e-6, offset=1.0), want, rtol=1e-6, atol=1e-6)


@VALUES
@given(seed=st.integers(0, 2**32 - 1), cap=st.sampled_from([1.0, 3.0, 30.0]))
def test_softcap_vs_transformers_formula(seed, cap):
    x = rand(np.random.default_rng(seed), (4, 33), "float32", -100, 100)
    t = torch.from_numpy(x)
    want = (torch.tanh(t / cap) * cap).numpy()                 # Gemma2ForCausalLM's final-logit capping
    np.testing.assert_allclose(ref("softcap", x, cap=cap), want, rtol=1e-6, atol=1e-7 * cap)   # numpy's / torch's tanh
    g = rand(np.random.default_rng(seed + 1), (4, 33), "float32")
    tt = t.clone().requires_grad_(True)
    (torch.tanh(tt / cap) * cap).backward(torch.from_numpy(g))
    np.testing.assert_allclose(ref("softcap_grad", g, x, cap=cap), tt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_scale_is_a_float32_constant():
    x = np.array([[1.0, -3.0]], np.float32)
    np.testing.assert_array_equal(ref("scale", x, factor=2304 ** 0.5), x * np.float32(2304 ** 0.5))


@VALUES
@given(seed=st.integers(0, 2**32 - 1), batch=token_batch(max_seqs=1, max_past=0, max_new=9),
       cap=st.sampled_from([0.5, 2.0, 50.0]), window=st.sampled_from([0, 3]))
def test_attention_softcap_vs_gemma2_eager(seed, batch, cap, window):
    """Gemma 2's eager attention: scores * scale, then cap * tanh(s / cap), then the (sliding) causal mask."""
    from types import SimpleNamespace

    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    _, sid, pos = batch
    order = np.argsort(pos)
    sid, pos = sid[order], pos[order]
    T, H, Hkv, D, scale = len(pos), 4, 2, 8, 0.4
    rng = np.random.default_rng(seed)
    q, k, v = rand(rng, (T, H, D), "float32"), rand(rng, (T, Hkv, D), "float32"), rand(rng, (T, Hkv, D), "float32")
    got = ref("causal_attention", q, k, v, pos, sid, scale=scale, sliding_window=window, softcap=cap)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    mask = torch.from_numpy(np.where(allowed, 0.0, -np.inf).astype(np.float32))[None, None]
    t = lambda a: torch.from_numpy(a).permute(1, 0, 2)[None]         # noqa: E731  (1, H, T, D)
    module = SimpleNamespace(num_key_value_groups=H // Hkv, training=False, head_dim=D)
    want, _ = eager_attention_forward(module, t(q), t(k), t(v), mask, scaling=scale, softcap=cap)
    np.testing.assert_allclose(got, want[0].numpy(), rtol=1e-5, atol=1e-5)


def _phi3_rope(max_pos: int, orig: int, half: int):
    """transformers' Phi-3 rotary embedding with longrope factors, and reft's attributes for it."""
    from reft_models.phi3 import phi3_rope
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    short = [1.0 + 0.5 * i for i in range(half)]
    long = [2.0 + 3.0 * i for i in range(half)]
    rp = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short, "long_factor": long}
    cfg = Phi3Config(hidden_size=8 * half, num_attention_heads=4, max_position_embeddings=max_pos,
                     original_max_position_embeddings=orig, rope_parameters=rp, pad_token_id=None)
    hf = {"rope_theta": 10000.0, "rope_scaling": rp, "max_position_embeddings": max_pos,
          "original_max_position_embeddings": orig}
    return Phi3RotaryEmbedding(cfg), dict(phi3_rope(hf, 2 * half))


@pytest.mark.parametrize("n", [5, 16, 17, 40])
def test_longrope_vs_phi3_rotary_embedding(n):
    """A sequence of n tokens in one call: the short factors up to 16 positions (the original context),
    the long ones past it, and cos/sin scaled by sqrt(1 + ln(64 / 16) / ln 16) either way."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    emb, attrs = _phi3_rope(64, 16, 4)
    assert attrs["attention_factor"] == pytest.approx((1 + np.log(4.0) / np.log(16.0)) ** 0.5)
    rng = np.random.default_rng(n)
    x = rand(rng, (n, 2, 8), "float32")
    pos = np.arange(n, dtype=np.int32)
    ext = ref("seq_extent", pos, np.zeros(n, np.int32))
    assert (ext == n).all()
    got = ref("rope", x, pos, ext, **attrs)
    xt = torch.from_numpy(x).permute(1, 0, 2)[None]                       # (1, H, T, D)
    cos, sin = emb(xt, torch.from_numpy(pos)[None].long())
    want, _ = apply_rotary_pos_emb(xt, xt, cos, sin)
    np.testing.assert_allclose(got, want[0].permute(1, 0, 2).numpy(), rtol=1e-5, atol=2e-5)


def test_seq_extent_is_per_sequence():
    pos = np.array([3, 0, 4, 1, 5, 2], np.int32)
    sid = np.array([1, 0, 1, 0, 1, 0], np.int64)
    np.testing.assert_array_equal(ref("seq_extent", pos, sid), [6, 3, 6, 3, 6, 3])
