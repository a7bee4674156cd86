"""Our own GGUF reader (llama.cpp's single-file model format, versions 2 and 3), memory-mapped.

Layout, all little-endian:
  "GGUF" magic, uint32 version, uint64 tensor count, uint64 metadata count
  metadata:  key (string), uint32 value type, value      string = uint64 length + UTF-8 bytes
             array = uint32 element type, uint64 count, elements
  tensors:   name, uint32 n_dims, uint64 dims[n_dims] (innermost first), uint32 GGML type,
             uint64 offset into the data section
  data:      starts at the end of the tensor records rounded up to `general.alignment` (32)

Notable:
- Shapes are given in numpy order (outermost first), i.e. the GGUF dims reversed, so a
  weight stored as ne = [in, out] reads as (out, in), the Hugging Face layout.
- `raw(name)` is a zero-copy read-only uint8 view of a tensor's bytes: quantized blocks are
  handed on undecoded (reft.quant reads them).
- Every inconsistency (bad magic, unknown version or value type, a record or tensor running
  past the end of the file, misaligned or overlapping tensors) is a one-line ModelError.
  Version 1 (32-bit counts) and big-endian files are refused by name.
- Numeric arrays come back as numpy arrays, string arrays as lists of str.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelError
from ..quant import FORMATS, get_format, type_name

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

# value type id -> (struct code, numpy dtype) for fixed-size scalars
_SCALARS = {0: ("<B", "u1"), 1: ("<b", "i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"),
            5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "?"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"),
            12: ("<d", "<f8")}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class TensorRecord:
    name: str
    ggml_type: int
    shape: tuple[int, ...]   # numpy order: outermost first
    offset: int              # absolute byte offset in the file
    nbytes: int | None       # None for a type reft cannot read

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)


class _Cursor:
    """Reads values from the mapped file; running past the end is a ModelError."""

    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.pos, self.path = buf, size, 0, path

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ModelError(f"{self.path}: truncated GGUF: {what} at byte {self.pos} runs past the end of the"
                             f" {self.size}-byte file")

    def scalar(self, code: str, what: str):
        n = struct.calcsize(code)
        self._need(n, what)
        (v,) = struct.unpack_from(code, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self._need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelError(f"{self.path}: corrupt GGUF: {what} is not valid UTF-8") from None

    def array(self, what: str):
        etype = self.scalar("<I", what)
        count = self.scalar("<Q", what)
        if etype in _SCALARS:
            dt = np.dtype(_SCALARS[etype][1])
            self._need(count * dt.itemsize, what)
            out = np.frombuffer(self.buf, dt, count=count, offset=self.pos).copy()
            self.pos += count * dt.itemsize
            return out
        if count > self.size - self.pos:  # every element takes at least a byte
            self._need(count, what)
        return [self.value(etype, what) for _ in range(count)]

    def value(self, vtype: int, what: str):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype][0], what)
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            return self.array(what)
        raise ModelError(f"{self.path}: corrupt GGUF: {what} has unknown value type {vtype}")


class GGUFFile:
    """One .gguf file: `version`, `metadata` (key -> value), `tensors` (name -> TensorRecord)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 24:
                    raise ModelError(f"{self.path}: truncated GGUF: {size} bytes, shorter than the 24-byte header")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise ModelError(f"{self.path}: cannot read: {e.strerror or e}") from None
        self.size = size
        cur = _Cursor(self._mm, size, self.path)
        magic = bytes(self._mm[:4])
        if magic != MAGIC:
            raise ModelError(f"{self.path}: not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
        cur.pos = 4
        self.version = cur.scalar("<I", "version")
        if self.version not in (2, 3):
            if self.version & 0xFFFF == 0 and self.version >> 16:
                raise ModelError(f"{self.path}: big-endian GGUF files are not supported")
            raise ModelError(f"{self.path}: GGUF version {self.version} is not supported (reft reads versions 2 and 3)")
        n_tensors = cur.scalar("<Q", "tensor count")
        n_kv = cur.scalar("<Q", "metadata count")
        if n_tensors > size or n_kv > size:
            raise ModelError(f"{self.path}: corrupt GGUF: {n_tensors} tensors / {n_kv} metadata entries cannot fit"
                             f" in {size} bytes")
        self.metadata: dict = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key {i}")
            self.metadata[key] = cur.value(cur.scalar("<I", f"type of {key!r}"), f"metadata {key!r}")
        records = [self._record(cur, i) for i in range(n_tensors)]
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not (isinstance(align, int) and align > 0 and align & (align - 1) == 0):
            raise ModelError(f"{self.path}: corrupt GGUF: general.alignment {align!r} is not a power of two")
        self.alignment = align
        self.data_start = -(-cur.pos // align) * align
        self.tensors = self._place(records)

    def _record(self, cur: _Cursor, i: int):
        name = cur.string(f"tensor {i} name")
        n_dims = cur.scalar("<I", f"tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise ModelError(f"{self.path}: corrupt GGUF: tensor {name!r} has {n_dims} dims (at most {MAX_DIMS})")
        dims = [cur.scalar("<Q", f"tensor {name!r}") for _ in range(n_dims)]
        ggml_type = cur.scalar("<I", f"tensor {name!r}")
        offset = cur.scalar("<Q", f"tensor {name!r}")
        return name, ggml_type, tuple(reversed(dims)), offset

    def _place(self, records) -> dict[str, TensorRecord]:
        out: dict[str, TensorRecord] = {}
        for name, ggml_type, shape, rel in records:
            if name in out:
                raise ModelError(f"{self.path}: corrupt GGUF: tensor {name!r} appears twice")
            if rel % self.alignment:
                raise ModelError(f"{self.path}: corrupt GGUF: tensor {name!r} at offset {rel} is not aligned to"
                                 f" {self.alignment}")
            nbytes = None
            if type_name(ggml_type) in FORMATS:
                nbytes = get_format(ggml_type).nbytes(shape or (1,))
                end = self.data_start + rel + nbytes
                if end > self.size:
                    raise ModelError(f"{self.path}: truncated GGUF: tensor {name!r} ends at byte {end} of a"
                                     f" {self.size}-byte file")
            out[name] = TensorRecord(name, ggml_type, shape, self.data_start + rel, nbytes)
        spans = sorted((r.offset, r.offset + r.nbytes, r.name) for r in out.values() if r.nbytes)
        for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise ModelError(f"{self.path}: corrupt GGUF: tensors {n0!r} and {n1!r} overlap")
        return out

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes, a read-only uint8 view of the mapping. Unsupported types raise a
        ModelError naming the type and the tensor."""
        r = self.tensors[name]
        if r.nbytes is None:
            raise ModelError(f"{self.path}: tensor {name!r} has unsupported type {r.type_name};"
                             f" reft reads {', '.join(FORMATS)}")
        return np.frombuffer(self._mm, np.uint8, count=r.nbytes, offset=r.offset)

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # views still exported: the mapping goes when they do
                pass
