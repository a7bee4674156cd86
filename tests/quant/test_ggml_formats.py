"""reft's GGML block formats against the `gguf` package (llama.cpp's own Python reference).

Every type: random valid blocks (any codes, finite float16 scales) dequantize to the same float32
bits as gguf.quants.dequantize. Types with a reference quantizer: reft's quantizer writes the
same bytes as gguf.quants.quantize for random arrays (zeros, ties and wide ranges included).
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from hypothesis import given, settings
from hypothesis import strategies as st

import quant_blocks
from reft import quant
from reft.errors import ModelError

ALL = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "MXFP4")
QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
EXAMPLES = settings(max_examples=60, deadline=None)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32),
                                                                                      b.view(np.uint32))


def random_blocks(name: str, n: int, seed: int) -> np.ndarray:
    return quant_blocks.random_blocks(name, n, np.random.default_rng(seed))


def test_registry_matches_ggml():
    assert set(quant.FORMATS) == set(ALL)
    for name in ALL:
        fmt, t = quant.get_format(name), GGMLQuantizationType[name]
        assert fmt.ggml_type == t.value
        assert (fmt.block_values, fmt.block_bytes) == GGML_QUANT_SIZES[t]
        assert quant.get_format(t.value) is fmt and quant.get_format(name.lower()) is fmt


@pytest.mark.parametrize("name", ALL)
@EXAMPLES
@given(rows=st.integers(1, 3), blocks=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_dequantize_random_blocks_matches_gguf(name, rows, blocks, seed):
    fmt = quant.get_format(name)
    n_values = blocks * (32 if fmt.block_values == 1 else fmt.block_values)
    raw = random_blocks(name, rows * n_values // fmt.block_values, seed).reshape(rows, -1)
    ours = quant.dequantize(raw, name, (rows, n_values))
    ref = gguf_dequantize(raw, GGMLQuantizationType[name])
    assert same_bits(ours, ref.astype(np.float32, copy=False))


@st.composite
def float_rows(draw):
    """float32[rows, 32*k]: normal noise at a random scale, with zeros, repeats and sign ties mixed in."""
    rows, blocks = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = 10.0 ** draw(st.integers(-6, 4))
    x = (rng.standard_normal((rows, 32 * blocks)) * scale).astype(np.float32)
    kind = draw(st.sampled_from(["plain", "zeros", "ties", "ints", "constant"]))
    if kind == "zeros":
        x[rng.random(x.shape) < 0.5] = 0
        x[:, :32] = 0  # at least one all-zero block
    elif kind == "ties":
        m = np.abs(x).max()
        x[:, 3], x[:, 7] = -m, m  # equal magnitudes of both signs: the first must win
    elif kind == "ints":
        x = rng.integers(-20, 21, x.shape).astype(np.float32)
    elif kind == "constant":
        x[:] = np.float32(draw(st.floats(-1e3, 1e3, width=32)))
    return x


@pytest.mark.parametrize("name", QUANTIZABLE)
@EXAMPLES
@given(x=float_rows())
def test_quantize_matches_gguf(name, x):
    t = GGMLQuantizationType[name]
    ref = np.ascontiguousarray(gguf_quantize(x, t)).view(np.uint8).reshape(x.shape[0], -1)
    ours = quant.quantize(x, name)
    assert ours.dtype == np.uint8 and np.array_equal(ours, ref)
    assert same_bits(quant.dequantize(ours, name, x.shape), gguf_dequantize(ref, t).astype(np.float32, copy=False))


def test_bf16_keeps_nan_and_rounds_to_even():
    x = np.array([np.nan, -np.nan, np.inf, 1 + 2**-8, 1 + 3 * 2**-8, 3.0e38], np.float32)
    ref = gguf_quantize(x, GGMLQuantizationType.BF16)
    assert np.array_equal(quant.quantize(x, "BF16"), ref.view(np.uint8))
    back = quant.dequantize(quant.quantize(x, "BF16"), "BF16", x.shape)
    assert np.isnan(back[:2]).all() and back[2] == np.inf and back[3] == 1.0 and back[4] == 1 + 4 * 2**-8


def test_dequantize_accepts_any_view_of_the_bytes():
    raw = random_blocks("Q4_K", 4, 7)
    flat = quant.dequantize(raw.reshape(-1), "Q4_K", (2, 512))
    assert same_bits(flat, quant.dequantize(raw.reshape(-1).view(np.uint32), 12, (2, 512)))


@pytest.mark.parametrize("qtype, shown", [(10, "Q2_K"), ("IQ2_XXS", "IQ2_XXS"), (99, "unknown type 99"),
                                          ("Q8_1", "Q8_1"), (20, "IQ4_NL")])
def test_unsupported_type_is_named(qtype, shown):
    with pytest.raises(ModelError, match=f"unsupported tensor type {shown}") as e:
        quant.dequantize(np.zeros(64, np.uint8), qtype, (1, 256))
    assert "Q4_K" in str(e.value)  # and the message lists what is supported


def test_wrong_sizes_are_clear_errors():
    with pytest.raises(ModelError, match="multiple of 32"):
        quant.dequantize(np.zeros(18, np.uint8), "Q4_0", (1, 30))
    with pytest.raises(ModelError, match="needs 36 bytes, got 35"):
        quant.dequantize(np.zeros(35, np.uint8), "Q4_0", (2, 32))
    with pytest.raises(ModelError, match="no quantizer for Q6_K"):
        quant.quantize(np.zeros((1, 256), np.float32), "Q6_K")
