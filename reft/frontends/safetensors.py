"""Our own safetensors reader and writer (the `safetensors` package is only a test dependency).

Format: 8-byte little-endian header length N, N bytes of JSON header
({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}), then the
data section; offsets are relative to the start of the data section.

Notable:
- Reading memory-maps the file; `get` returns a read-only zero-copy view (bfloat16 through
  ml_dtypes). Every header inconsistency (offsets out of range, size not matching
  shape * itemsize, overlapping tensors, short data section) is a one-line ModelError.
- `WeightSource` is a lazy Mapping over a model folder: one `model.safetensors` or a sharded
  `model.safetensors.index.json`; shards are opened on first use.
- Stacked names: a name with a `*` path component is the stack of the tensors with 0, 1, 2, ...
  in its place (`model.layers.0.block_sparse_moe.experts.*.w1.weight` is [E, F, D] from Mixtral's
  per-expert `experts.N.w1.weight`), so a model definition asks for its experts as one weight under
  the checkpoint's own names; the members must agree in dtype and shape.
- MXFP4 pairs: a name stored as transformers' MXFP4 blocks and scales (`<name>_blocks`,
  `<name>_scales`: GPT-OSS's released experts, `quant_method: mxfp4`) reads as the float32 tensor
  transformers' loader makes of them (reft/quant/mxfp4.py: dequantized [E, N, K], transposed to the
  [E, K, N] of the float checkpoints), so a model asks for the same name whichever form it has.
- `write_safetensors` computes the header from declarations first, then streams each tensor
  to a temporary file one at a time (never all in memory) and renames it into place. Tensors
  are laid out by itemsize, largest first (stable), so every tensor is aligned to its dtype
  once the header is padded with spaces to a multiple of 8 - the same rule the package uses.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import ModelError

# safetensors dtype code -> (our dtype name, numpy dtype). The first six are the IR dtypes.
_CODES: dict[str, tuple[str, np.dtype]] = {
    "F32": ("float32", np.dtype("<f4")),
    "F16": ("float16", np.dtype("<f2")),
    "BF16": ("bfloat16", np.dtype(ml_dtypes.bfloat16)),
    "I32": ("int32", np.dtype("<i4")),
    "I64": ("int64", np.dtype("<i8")),
    "U8": ("uint8", np.dtype("u1")),
    "F64": ("float64", np.dtype("<f8")),
    "I8": ("int8", np.dtype("i1")),
    "I16": ("int16", np.dtype("<i2")),
    "U16": ("uint16", np.dtype("<u2")),
    "U32": ("uint32", np.dtype("<u4")),
    "U64": ("uint64", np.dtype("<u8")),
    "BOOL": ("bool", np.dtype("?")),
    "F8_E4M3": ("float8_e4m3fn", np.dtype(ml_dtypes.float8_e4m3fn)),
    "F8_E5M2": ("float8_e5m2", np.dtype(ml_dtypes.float8_e5m2)),
}
DTYPES: dict[str, np.dtype] = {name: dt for name, dt in _CODES.values()}  # our name -> numpy
_CODE_OF: dict[str, str] = {name: code for code, (name, _) in _CODES.items()}  # our name -> code
STACK = "*"   # the path component of a stacked name (WeightSource)
_MAX_HEADER = 100 * 1024 * 1024  # the package's own limit


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class SafetensorsFile:
    """One .safetensors file, memory-mapped; tensors are parsed from the header on open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if len(head) < 8:
                    raise self._err(f"truncated safetensors: {size} bytes, shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise self._err(f"corrupt safetensors: header length {n} runs past the end of the {size}-byte file")
                raw = f.read(n)
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise ModelError(f"{self.path}: cannot read: {e.strerror or e}") from None
        self._start = 8 + n
        self._entries, self.metadata = self._parse(raw, size - self._start)

    def _err(self, msg: str) -> ModelError:
        return ModelError(f"{self.path}: {msg}")

    def _parse(self, raw: bytes, data_len: int):
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._err(f"corrupt safetensors: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._err("corrupt safetensors: header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise self._err("corrupt safetensors: __metadata__ is not an object")
        entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            if not (isinstance(e, dict) and {"dtype", "shape", "data_offsets"} <= e.keys()):
                raise self._err(f"corrupt safetensors: tensor {name!r} lacks dtype/shape/data_offsets")
            code, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
            if code not in _CODES:
                raise self._err(f"tensor {name!r} has unsupported dtype {code}")
            ok = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
            ok = ok and isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
            if not ok:
                raise self._err(f"corrupt safetensors: tensor {name!r} has a malformed shape or data_offsets")
            dtype_name, dt = _CODES[code]
            begin, end = offs
            if not 0 <= begin <= end:
                raise self._err(f"corrupt safetensors: tensor {name!r} has data_offsets {offs} out of order")
            if end - begin != _numel(shape) * dt.itemsize:
                raise self._err(f"corrupt safetensors: tensor {name!r} data_offsets {offs} do not match "
                                f"shape {shape} of {code} ({_numel(shape) * dt.itemsize} bytes)")
            entries[name] = (dtype_name, tuple(shape), begin, end)
        spans = sorted((b, e, n) for n, (_, _, b, e) in entries.items() if e > b)
        for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise self._err(f"corrupt safetensors: tensors {n0!r} and {n1!r} overlap")
        if spans and spans[-1][1] > data_len:
            raise self._err(f"truncated safetensors: tensor {spans[-1][2]!r} ends at byte {spans[-1][1]} "
                            f"of the data section, which holds only {data_len} bytes")
        return entries, metadata

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        dtype_name, shape, _, _ = self._entry(name)
        return dtype_name, shape

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}") from None

    def get(self, name: str) -> np.ndarray:
        """A read-only view into the mapped file."""
        dtype_name, shape, begin, end = self._entry(name)
        if self._mm is None:
            raise ValueError(f"{self.path} is closed")
        dt = DTYPES[dtype_name]
        if end == begin:
            arr = np.empty(shape, dt)
            arr.flags.writeable = False
            return arr
        return np.frombuffer(self._mm, dt, count=_numel(shape), offset=self._start + begin).reshape(shape)

    def close(self) -> None:
        """Release the mapping; arrays handed out keep it alive until they are gone."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # views still exported: the mapping goes when they do
                pass

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WeightSource(Mapping):
    """The checkpoint's tensors by name, read lazily from one file or from shards."""

    def __init__(self, files: dict[str, Path], where: dict[str, str] | None):
        self._paths = files  # shard file name -> path
        self._where = where  # tensor name -> shard file name; None until the single file is open
        self._open: dict[str, SafetensorsFile] = {}
        if where is None:
            (only,) = files
            self._where = dict.fromkeys(self._shard(only).names(), only)

    def _shard(self, fname: str) -> SafetensorsFile:
        f = self._open.get(fname)
        if f is None:
            f = self._open[fname] = SafetensorsFile(self._paths[fname])
        return f

    def _file_of(self, name: str) -> SafetensorsFile:
        fname = self._where[name]  # KeyError for unknown tensors, as a Mapping should
        f = self._shard(fname)
        if name not in f:
            raise ModelError(f"{f.path}: the index puts tensor {name!r} in this shard but it is not there")
        return f

    def _members(self, name: str) -> list[str] | None:
        """The tensors a stacked name (one `*` path component) stands for, or None."""
        parts = name.split(".")
        if name in self._where or parts.count(STACK) != 1:
            return None
        at = parts.index(STACK)
        members = []
        while (m := ".".join(parts[:at] + [str(len(members))] + parts[at + 1:])) in self._where:
            members.append(m)
        return members or None

    def _mxfp4(self, name: str) -> tuple[str, str] | None:
        """The (`<name>_blocks`, `<name>_scales`) pair a weight is stored as, or None."""
        pair = (name + "_blocks", name + "_scales")
        return pair if name not in self._where and all(p in self._where for p in pair) else None

    def __getitem__(self, name: str) -> np.ndarray:
        members = self._members(name)
        if members:
            return np.stack([self[m] for m in members])
        pair = self._mxfp4(name)
        if pair:
            from ..quant.mxfp4 import dequantize_packed

            try:
                w = dequantize_packed(*(self._file_of(p).get(p) for p in pair))       # [E, N, K]
            except ValueError as e:
                raise ModelError(f"{name}: {e}") from None
            return np.ascontiguousarray(np.swapaxes(w, -1, -2))
        return self._file_of(name).get(name)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        members = self._members(name)
        pair = None if members else self._mxfp4(name)
        if pair:
            (bdt, blocks), (sdt, scales) = (self._file_of(p).info(p) for p in pair)
            if bdt != "uint8" or sdt != "uint8" or blocks[:-1] != scales or blocks[-1:] != (16,):
                raise ModelError(f"{name}: MXFP4 blocks {bdt}{list(blocks)} and scales {sdt}{list(scales)}"
                                 " do not pair up")
            return "float32", (*scales[:-2], scales[-1] * 32, scales[-2])
        if not members:
            return self._file_of(name).info(name)
        infos = {self._file_of(m).info(m) for m in members}
        if len(infos) != 1:
            raise ModelError(f"the tensors stacked as {name} differ in dtype or shape: {sorted(infos)}")
        dtype, shape = infos.pop()
        return dtype, (len(members), *shape)

    def __contains__(self, name) -> bool:
        return name in self._where or self._members(name) is not None or self._mxfp4(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def __enter__(self) -> WeightSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_weights(model_dir: str | Path) -> WeightSource:
    """The tensors of a HF model folder (or of one .safetensors file)."""
    p = Path(model_dir)
    if p.is_file() and p.suffix == ".safetensors":
        return WeightSource({p.name: p}, None)
    if not p.is_dir():
        raise ModelError(f"{p}: no such model directory")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise ModelError(f"{index}: not a valid safetensors index ({e})") from None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise ModelError(f"{index}: weight_map is missing or not an object of file names")
        files = {f: p / f for f in dict.fromkeys(wm.values())}
        for f, path in files.items():
            if not path.is_file():
                raise ModelError(f"{index}: shard {f} is missing")
        return WeightSource(files, dict(wm))
    single = p / "model.safetensors"
    if single.is_file():
        return WeightSource({single.name: single}, None)
    raise ModelError(f"no model.safetensors or model.safetensors.index.json in {p} "
                     "(PyTorch .bin checkpoints are not supported; convert them to safetensors)")


TensorDecl = tuple[str, str, tuple[int, ...], Callable[[], np.ndarray]]


def write_safetensors(path: str | Path, tensors: Iterable[TensorDecl], metadata: dict | None = None,
                      progress: Callable[[str, int], None] | None = None) -> None:
    """Write (name, dtype_name, shape, producer) tensors, calling each producer once, in file order."""
    path = Path(path)
    decls = [(n, d, tuple(int(x) for x in s), p) for n, d, s, p in tensors]
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    seen = set()
    for n, d, _, _ in decls:
        if d not in DTYPES:
            raise ValueError(f"tensor {n!r}: dtype {d!r} cannot be stored in safetensors")
        if n in seen or n == "__metadata__":
            raise ValueError(f"tensor name {n!r} is duplicated or reserved")
        seen.add(n)
    decls.sort(key=lambda t: -DTYPES[t[1]].itemsize)  # stable: largest alignment first
    offset = 0
    for n, d, s, _ in decls:
        nbytes = _numel(s) * DTYPES[d].itemsize
        header[n] = {"dtype": _CODE_OF[d], "shape": list(s), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for n, d, s, producer in decls:
                arr = np.asarray(producer())
                if arr.dtype != DTYPES[d] or arr.shape != s:
                    raise ValueError(f"tensor {n!r}: declared {d}{list(s)}, produced {arr.dtype}{list(arr.shape)}")
                data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
                f.write(data.data)
                if progress is not None:
                    progress(n, data.nbytes)
                del arr, data
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
