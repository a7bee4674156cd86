"""reft's own GGUF reader against the `gguf` package's reader and writer."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize as gguf_dequantize
from gguf_util import write_gguf
from hypothesis import given, settings
from hypothesis import strategies as st
from paths import SHARED_MODELS
from quant_blocks import random_blocks

from reft.errors import ModelError
from reft.frontends.gguf_file import GGUFFile
from reft.quant import dequantize, get_format

STORIES_GGUF = SHARED_MODELS / "stories260K" / "stories260K.gguf"
needs_stories = pytest.mark.skipif(not STORIES_GGUF.is_file(), reason="shared/models/stories260K is absent")
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
V = GGUFValueType


def _plain(v):
    return v.tolist() if isinstance(v, np.ndarray) else v


@needs_stories
def test_stories_matches_gguf_reader():
    ours, ref = GGUFFile(STORIES_GGUF), GGUFReader(str(STORIES_GGUF))
    assert ours.version == 3
    fields = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert {k: _plain(v) for k, v in ours.metadata.items()} == fields
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        r = ours.tensors[t.name]
        assert r.type_name == t.tensor_type.name and r.shape == tuple(reversed(t.shape.tolist()))
        assert r.offset == t.data_offset and r.nbytes == t.n_bytes
        assert np.array_equal(ours.raw(t.name), np.asarray(t.data).reshape(-1).view(np.uint8))


def _tensor(rng, name: str, rows: int, cols: int):
    """(data, GGML type for the writer): floats for F32/F16, raw blocks otherwise."""
    if name in ("F32", "F16"):
        return rng.standard_normal((rows, cols)).astype(name.replace("F", "float")), None
    fmt = get_format(name)
    raw = random_blocks(name, rows * cols // fmt.block_values, rng)
    return raw.reshape(rows, -1), GGMLQuantizationType[name]


def test_every_type_and_value_kind_round_trips(tmp_path):
    """A file with one tensor of each supported type and a metadata value of each kind."""
    rng = np.random.default_rng(0)
    kv = {"general.name": ("tiny", V.STRING), "t.u8": (7, V.UINT8), "t.i8": (-7, V.INT8), "t.u16": (700, V.UINT16),
          "t.i16": (-700, V.INT16), "t.u32": (0xFFFFFFFF, V.UINT32), "t.i32": (-70000, V.INT32),
          "t.f32": (0.5, V.FLOAT32), "t.bool": (True, V.BOOL), "t.u64": (2**40, V.UINT64), "t.i64": (-2**40, V.INT64),
          "t.f64": (1e-300, V.FLOAT64), "t.strs": (["a", "é", ""], V.ARRAY, V.STRING),
          "t.ints": ([1, -2, 3], V.ARRAY, V.INT32), "t.floats": ([0.25, -1.5], V.ARRAY, V.FLOAT32)}
    tensors = [(f"w.{name}", *_tensor(rng, name, 3, 512)) for name in TYPES]
    path = write_gguf(tmp_path / "all.gguf", "llama", kv, tensors)
    f, ref = GGUFFile(path), GGUFReader(str(path))
    assert {k: _plain(f.metadata[k]) for k in kv} == {k: v[0] for k, v in kv.items()}
    for i, name in enumerate(TYPES):
        r = f.tensors[f"w.{name}"]
        assert r.type_name == name and r.shape == (3, 512)
        want = gguf_dequantize(np.asarray(ref.tensors[i].data), GGMLQuantizationType[name]).astype(np.float32)
        ours = dequantize(f.raw(f"w.{name}"), name, r.shape)
        assert np.array_equal(ours.view(np.uint32), want.reshape(3, 512).view(np.uint32)), name


def _header(magic=b"GGUF", version=3, n_tensors=0, n_kv=0):
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv)


@pytest.mark.parametrize("data, message", [
    (b"", "truncated GGUF: 0 bytes"),
    (b"GGML" + b"\0" * 40, "not a GGUF file"),
    (_header(version=1), "GGUF version 1 is not supported"),
    (_header(version=3 << 24), "big-endian"),
    (_header(n_kv=1) + struct.pack("<Q", 100) + b"abc", "truncated GGUF: metadata key 0"),
    (_header(n_kv=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 77), "unknown value type 77"),
    (_header(n_kv=2**40), "cannot fit"),
    (_header(n_kv=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 8) + struct.pack("<Q", 2) + b"\xff\xfe",
     "not valid UTF-8"),
])
def test_corrupt_headers_are_one_line_errors(tmp_path, data, message):
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    with pytest.raises(ModelError, match=message) as e:
        GGUFFile(p)
    assert "\n" not in str(e.value) and str(p) in str(e.value)


@needs_stories
@settings(max_examples=40, deadline=None)
@given(cut=st.floats(0.0, 0.999))
def test_any_truncation_is_reported(tmp_path_factory, cut):
    data = STORIES_GGUF.read_bytes()
    p = tmp_path_factory.mktemp("cut") / "cut.gguf"
    p.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(ModelError, match="truncated GGUF"):
        GGUFFile(p)


def test_unsupported_type_named_on_read(tmp_path):
    raw = np.zeros((2, 84), np.uint8)  # two Q2_K blocks
    path = write_gguf(tmp_path / "q2k.gguf", "llama", {}, [("w", raw, GGMLQuantizationType.Q2_K)])
    f = GGUFFile(path)
    assert f.tensors["w"].type_name == "Q2_K" and f.tensors["w"].nbytes is None
    with pytest.raises(ModelError, match="tensor 'w' has unsupported type Q2_K"):
        f.raw("w")
