"""Dropout with a counter-based random mask (LoRA dropout in training graphs, add_lora).

  dropout(x[...], key[]) -> like x        {p, stream}
      y[i] = x[i] * scale if keep(key, stream, i) else 0,   scale = float32(1 / (1 - p))
      (inverted dropout, as torch.nn.Dropout: the expectation of y is x)

The mask is a pure function of (key, stream, i), i the flat row-major index of the element:

  base    = mix64(key ^ mix64(stream))                  key: int64[] read as uint64
  bits(i) = mix64(base + (i + 1) * 0x9E3779B97F4A7C15)  the (i + 1)-th SplitMix64 output from base
  keep(i) = bits(i) >> 40 >= threshold,  threshold = round(p * 2^24)

mix64 is SplitMix64's finalizer (Steele, Lea, Flood 2014): z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31 (uint64, wrapping). So every element is drawn
independently of the order or the thread that computes it, and a kernel reproduces the reference
bit for bit. The training runtime feeds a fresh key per micro-batch (from the seed, the step and
the micro-batch: reft/runtime/train/trainer.py dropout_key); `stream` tells the dropout nodes of one
graph apart (add_lora: a hash of the adapted module's name), so masks differ between layers while
a resumed run redraws exactly the masks it would have drawn.

The gradient applies the same mask: dx = dropout(dy, key) with the same attributes (dy has x's
shape, so every element meets its own mask bit again).
"""
from __future__ import annotations

import numpy as np

from ..types import TensorType
from .registry import check, op

GOLDEN = 0x9E3779B97F4A7C15
M1, M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
BITS = 24                                   # uniform bits compared with the threshold
KEY = TensorType((), "int64")


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    z = np.asarray(z, np.uint64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(M2)
    return z ^ (z >> np.uint64(31))


def threshold(p: float) -> int:
    """Elements whose 24 mask bits fall below this are dropped."""
    return int(round(float(p) * (1 << BITS)))


def keep_mask(key: int, stream: int, n: int, p: float) -> np.ndarray:
    """bool[n]: which of the first n elements dropout(key, stream, p) keeps."""
    k = np.array([int(key) & (2**64 - 1)], np.uint64)
    base = mix64(k ^ mix64(np.array([int(stream)], np.uint64)))
    i = np.arange(1, n + 1, dtype=np.uint64)
    return (mix64(base + i * np.uint64(GOLDEN)) >> np.uint64(64 - BITS)) >= np.uint64(threshold(p))


def scale(p: float) -> np.float32:
    return np.float32(1.0 / (1.0 - float(p)))


def _infer(ts, a):
    x, key = ts
    check(x.dtype == "float32", f"dropout: x must be float32, got {x}")
    check(key == KEY, f"dropout: key must be int64[], got {key}")
    check(0.0 <= float(a["p"]) < 1.0, f"dropout: p must be in [0, 1), got {a['p']}")
    check(isinstance(a["stream"], int) and 0 <= a["stream"] < 2**32,
          f"dropout: stream must be a uint32, got {a['stream']}")
    return [x]


def _ref(xs, a):
    x, key = xs
    keep = keep_mask(int(np.asarray(key)), a["stream"], x.size, a["p"]).reshape(x.shape)
    return [np.where(keep, x * scale(a["p"]), np.float32(0.0)).astype(np.float32)]


def _vjp(b, node, cts, wants):
    return [b.dropout(cts[0], node.inputs[1], **node.attrs), None]


op("dropout", infer=_infer, ref=_ref, vjp=_vjp, arity=2, attrs=("p", "stream"),
   doc="x * 1/(1-p) where a counter-based mask of (key, stream, element index) keeps it, else 0.")
