"""Host memory for the CPU backend: weights read into hugepage-backed anonymous memory.

A file mmap would be instant but gets 4 KiB pages; anonymous memory with MADV_HUGEPAGE reads
about 1.5x faster on this class of machine (docs/benchmarks.md), and decode streams every
weight once per token. The file is read (not mapped) into that memory, so the page cache's
copy is not part of the process and the weights are held once.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import struct
from pathlib import Path

import numpy as np

from ...errors import PlanError

HUGE = 2 << 20


def anon(nbytes: int, huge: bool = True) -> mmap.mmap:
    size = max(HUGE, -(-nbytes // HUGE) * HUGE)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return buf


def address(buf) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class HostWeights:
    """The data section of a safetensors file in anonymous memory; name -> address."""

    def __init__(self, path: Path, huge: bool = True):
        try:
            with open(path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
                size = path.stat().st_size - 8 - n
                self.buf = anon(size, huge)
                view = memoryview(self.buf)[:size]
                got = 0
                while got < size:
                    k = f.readinto(view[got:])
                    if not k:
                        raise PlanError(f"{path}: truncated weights")
                    got += k
                view.release()
        except (OSError, ValueError, struct.error) as e:
            raise PlanError(f"{path}: cannot read weights ({e})") from None
        header.pop("__metadata__", None)
        self.base = address(self.buf)
        self.offsets = {k: v["data_offsets"][0] for k, v in header.items()}
        self.nbytes = size

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "HostWeights":
        """Pack in-memory arrays (64-byte aligned) — for running graphs that are not plans."""
        self = cls.__new__(cls)
        self.offsets, at = {}, 0
        for k, a in arrays.items():
            self.offsets[k] = at
            at += -(-a.nbytes // 64) * 64
        self.buf = anon(max(at, 64))
        self.base = address(self.buf)
        self.nbytes = at
        for k, a in arrays.items():
            b = np.ascontiguousarray(a)
            np.frombuffer(self.buf, np.uint8, b.nbytes, self.offsets[k])[:] = b.view(np.uint8).reshape(-1)
        return self

    def address(self, name: str) -> int:
        return self.base + self.offsets[name]

    def array(self, name: str, dtype: np.dtype, shape) -> np.ndarray:
        off = self.offsets[name]
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self.buf, dtype=dtype, count=count, offset=off).reshape(shape)
