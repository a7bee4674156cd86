"""Our safetensors reader/writer against the `safetensors` package, plus every corrupt-file case."""
from paths import STORIES_HF
import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reft.errors import ModelError
from reft.frontends.safetensors import DTYPES, SafetensorsFile, open_weights, write_safetensors

STORIES = str(STORIES_HF)


def _sample():
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "f64": rng.standard_normal((2, 2, 2)),
        "i32": rng.integers(-99, 99, (4, 1), dtype=np.int32),
        "i64": rng.integers(-99, 99, (6,), dtype=np.int64),
        "u8": rng.integers(0, 255, (9,), dtype=np.uint8),
        "i8": rng.integers(-9, 9, (3,), dtype=np.int8),
        "flag": np.array([True, False, True]),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def test_reads_package_written_file(tmp_path):
    tensors = _sample()
    safetensors.numpy.save_file(tensors, tmp_path / "a.safetensors", metadata={"format": "np"})
    f = SafetensorsFile(tmp_path / "a.safetensors")
    assert sorted(f.names()) == sorted(tensors)
    assert f.metadata == {"format": "np"}
    assert f.info("f32") == ("float32", (3, 5)) and f.info("u8") == ("uint8", (9,))
    assert f.info("f64") == ("float64", (2, 2, 2)) and f.info("scalar") == ("float32", ())
    for name, want in tensors.items():
        got = f.get(name)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert not got.flags.writeable
    assert not f.get("f32").flags.owndata  # a view of the mapping, not a copy
    with pytest.raises(KeyError):
        f.get("nope")


def test_reads_torch_bfloat16(tmp_path):
    t = torch.randn(4, 6, dtype=torch.bfloat16)
    safetensors.torch.save_file({"w": t}, tmp_path / "b.safetensors")
    f = SafetensorsFile(tmp_path / "b.safetensors")
    got = f.get("w")
    assert f.info("w") == ("bfloat16", (4, 6)) and got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())


def _declare(tensors, dtype_of=None):
    return [(n, dtype_of(a) if dtype_of else _name(a), a.shape, (lambda a=a: a)) for n, a in tensors.items()]


def _name(a):
    return next(k for k, v in DTYPES.items() if v == a.dtype)


def test_package_reads_ours(tmp_path):
    tensors = _sample()
    path = tmp_path / "ours.safetensors"
    write_safetensors(path, _declare(tensors), metadata={"k": "v"})
    back = safetensors.numpy.load_file(path)
    assert sorted(back) == sorted(tensors)
    for n in tensors:
        np.testing.assert_array_equal(back[n], tensors[n])
    with safetensors.safe_open(path, "np") as f:
        assert f.metadata() == {"k": "v"}
    # alignment: data section starts at a multiple of 8 and every tensor at a multiple of its itemsize
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(path.read_bytes()[8:8 + n])
    for name, e in header.items():
        if name != "__metadata__":
            assert e["data_offsets"][0] % tensors[name].dtype.itemsize == 0


def test_write_bfloat16_read_by_torch(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
    write_safetensors(tmp_path / "bf.safetensors", [("w", "bfloat16", (3, 4), lambda: a)])
    t = safetensors.torch.load_file(tmp_path / "bf.safetensors")["w"]
    assert t.dtype == torch.bfloat16
    np.testing.assert_array_equal(t.float().numpy(), a.astype(np.float32))


def test_write_streams_one_at_a_time(tmp_path):
    live, calls, seen = [], [], []

    def producer(name, shape, dtype):
        def make():
            calls.append(name)
            live.append(name)
            return np.ones(shape, dtype)
        return make

    decls = [("a", "float16", (2,), producer("a", (2,), np.float16)),
             ("b", "float32", (3,), producer("b", (3,), np.float32)),
             ("c", "float32", (1, 2), producer("c", (1, 2), np.float32))]
    write_safetensors(tmp_path / "s.safetensors", decls, progress=lambda n, nb: seen.append((n, nb)))
    assert calls == ["b", "c", "a"]  # largest itemsize first, otherwise declaration order
    assert seen == [("b", 12), ("c", 8), ("a", 4)]
    assert SafetensorsFile(tmp_path / "s.safetensors").get("c").shape == (1, 2)


@pytest.mark.parametrize("bad", [np.zeros((2,), np.float16), np.zeros((3,), np.float32)])
def test_write_checks_declarations(tmp_path, bad):
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="declared float32"):
        write_safetensors(path, [("x", "float32", (2,), lambda: bad)])
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_write_rejects_unknown_dtype(tmp_path):
    with pytest.raises(ValueError, match="complex64"):
        write_safetensors(tmp_path / "x.safetensors", [("x", "complex64", (1,), lambda: None)])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["float32", "float16", "bfloat16", "int32", "int64", "uint8"]),
                          st.lists(st.integers(0, 4), max_size=3)), min_size=1, max_size=5))
def test_roundtrip_random(tmp_path_factory, specs):
    path = tmp_path_factory.mktemp("rt") / "r.safetensors"
    rng = np.random.default_rng(1)
    tensors = {f"t{i}": (rng.standard_normal(s) * 50).astype(DTYPES[d]) for i, (d, s) in enumerate(specs)}
    write_safetensors(path, _declare(tensors))
    f = SafetensorsFile(path)
    for n, a in tensors.items():
        np.testing.assert_array_equal(f.get(n), a)
    f.close()


# --- corrupt files -----------------------------------------------------------------------------------------
def _raw(header, data=b"", n=None):
    h = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(h) if n is None else n) + h + data


GOOD = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
CORRUPT = {
    "empty": (b"", "truncated"),
    "short": (b"\x01\x02\x03", "truncated"),
    "header past end": (_raw(GOOD, b"\0" * 8, n=10_000), "header length"),
    "huge header": (_raw(GOOD, b"\0" * 8, n=2**63), "header length"),
    "bad json": (_raw(b"{not json", b""), "not valid JSON"),
    "not utf8": (_raw(b"\xff\xfe\xfd", b""), "not valid JSON"),
    "not object": (_raw([1, 2]), "not a JSON object"),
    "missing keys": (_raw({"w": {"dtype": "F32"}}), "lacks dtype"),
    "bad dtype": (_raw({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8), "'w' has unsupported dtype C64"),
    "bad shape": (_raw({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "malformed"),
    "size mismatch": (_raw({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 12), "do not match"),
    "reversed": (_raw({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8), "out of order"),
    "overlap": (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlap"),
    "truncated data": (_raw(GOOD, b"\0" * 5), "truncated"),
    "bad metadata": (_raw({"__metadata__": [1]}), "__metadata__"),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_files_are_model_errors(tmp_path, case):
    raw, words = CORRUPT[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(ModelError, match=words) as e:
        SafetensorsFile(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_not_a_file(tmp_path):
    with pytest.raises(ModelError, match="cannot read"):
        SafetensorsFile(tmp_path)


def test_truncated_real_file(tmp_path):
    raw = open(f"{STORIES}/model.safetensors", "rb").read()
    (tmp_path / "model.safetensors").write_bytes(raw[:-100])
    with pytest.raises(ModelError, match="truncated safetensors"):
        open_weights(tmp_path)


# --- model folders -----------------------------------------------------------------------------------------
def test_open_weights_single_file_matches_package():
    w = open_weights(STORIES)
    ref = safetensors.numpy.load_file(f"{STORIES}/model.safetensors")
    assert set(w) == set(ref) and len(w) == len(ref)
    for n, a in ref.items():
        assert w.info(n) == ("float32", a.shape)
        np.testing.assert_array_equal(w[n], a)
    assert "nope" not in w and w.get("nope") is None
    w.close()


def _sharded(tmp_path):
    a, b = _sample(), {"x": np.arange(5, dtype=np.float32), "y": np.ones((2, 2), np.int64)}
    safetensors.numpy.save_file(a, tmp_path / "model-00001-of-00002.safetensors")
    safetensors.numpy.save_file(b, tmp_path / "model-00002-of-00002.safetensors")
    wm = {**dict.fromkeys(a, "model-00001-of-00002.safetensors"), **dict.fromkeys(b, "model-00002-of-00002.safetensors")}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return {**a, **b}, wm


def test_open_weights_sharded(tmp_path):
    tensors, _ = _sharded(tmp_path)
    with open_weights(tmp_path) as w:
        assert sorted(w) == sorted(tensors) and len(w) == len(tensors)
        assert w.info("y") == ("int64", (2, 2))
        for n, a in tensors.items():
            np.testing.assert_array_equal(w[n], a)
        with pytest.raises(KeyError):
            w["nope"]
        kept = w["x"]
    np.testing.assert_array_equal(kept, tensors["x"])  # views outlive close()


def test_sharded_missing_shard(tmp_path):
    _sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match="shard model-00002-of-00002.safetensors is missing"):
        open_weights(tmp_path)


def test_sharded_index_lies(tmp_path):
    _, wm = _sharded(tmp_path)
    wm["x"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(ModelError, match="'x'.*not there"):
        open_weights(tmp_path)["x"]


@pytest.mark.parametrize("text", ["{", "[]", '{"weight_map": 3}'])
def test_bad_index(tmp_path, text):
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ModelError, match="index"):
        open_weights(tmp_path)


def test_no_weights(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelError, match=r"no model.safetensors .*\.bin"):
        open_weights(tmp_path)
    with pytest.raises(ModelError, match="no such model directory"):
        open_weights(tmp_path / "missing")
