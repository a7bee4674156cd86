"""Host memory for the CPU backend: the plan's weights mapped from the file, in huge pages.

Decode streams every weight once per token, so what matters is how fast the weights read:
memory behind 2 MiB page-table entries reads about 1.5x faster than 4 KiB pages on this class
of machine (docs/benchmarks.md). Two ways to get there:

- map the file: instant when the file is in the page cache, and the page cache's copy is the
  only one. Linux >= 6.x keeps files of filesystems with large-folio support (ext4, xfs, btrfs)
  in 2 MiB folios and maps them with 2 MiB entries (FilePmdMapped in smaps) when the mapping
  asks for huge pages: measured here, 1B f32 plan loads in 0.13 s and decodes as fast as
  anonymous huge pages.
- read the file into anonymous MADV_HUGEPAGE memory: works on every kernel, costs a copy
  (about 1 GB/s: 4.5-9.5 s for the 1B f32 plan) and holds the weights in process memory while
  the page cache may keep its own copy until evicted.

HostWeights maps first and checks the kernel's answer; if under half the mapping is backed by
2 MiB entries it reads the file into anonymous huge pages instead (REFT_WEIGHTS=read|map forces
a choice).
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import struct
from pathlib import Path

import numpy as np

from ... import settings
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


def address_of_map(buf: mmap.mmap) -> int:
    """Start address of a mapping, read-only ones included (ctypes needs a writable buffer)."""
    return np.frombuffer(buf, np.uint8).ctypes.data


def _pmd_mapped_bytes(start: int) -> int:
    """FilePmdMapped of the mapping that begins at `start` (0 when unknown)."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return 0
    head = re.compile(r"^([0-9a-f]+)-[0-9a-f]+ ", re.M)
    for m in head.finditer(text):
        if int(m.group(1), 16) == start:
            nxt = head.search(text, m.end())
            entry = text[m.end():nxt.start() if nxt else len(text)]
            got = re.search(r"^FilePmdMapped:\s+(\d+) kB", entry, re.M)
            return int(got.group(1)) * 1024 if got else 0
    return 0


def _read_header(f, path: Path) -> tuple[dict, int]:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class HostWeights:
    """The data section of a safetensors file in memory; name -> address."""

    def __init__(self, path: Path, huge: bool = True, writable: bool = False):
        """writable: the weights go to anonymous memory the entry points may write (training);
        otherwise REFT_WEIGHTS (reft/settings.py) picks the read-only mapping or a copy."""
        mode = "read" if writable else settings.weights_mode()
        try:
            with open(path, "rb") as f:
                header, start = _read_header(f, path)
                size = path.stat().st_size - start
                if size < 0:
                    raise PlanError(f"{path}: truncated weights")
                self.mode = "read"
                if mode != "read" and size > 0:
                    self.buf, self.start = self._map(f, huge), start
                    self.mode = "map"
                    if mode == "auto" and huge and _pmd_mapped_bytes(address_of_map(self.buf)) < size // 2:
                        self.buf.close()
                        self.mode = "read"
                if self.mode == "read":
                    self.buf, self.start = self._read(f, path, size, huge), 0
        except (OSError, ValueError, struct.error) as e:
            raise PlanError(f"{path}: cannot read weights ({e})") from None
        self.base = address_of_map(self.buf) + self.start
        self.offsets = {k: v["data_offsets"][0] for k, v in header.items()}
        self.nbytes = size

    @staticmethod
    def _map(f, huge: bool) -> mmap.mmap:
        """Read-only private mapping of the whole file, every page faulted in now."""
        buf = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        if huge and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                buf.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        view = np.frombuffer(buf, np.uint8)
        view[::4096].max()          # fault every page in (a cold file is read here, once)
        del view
        return buf

    @staticmethod
    def _read(f, path: Path, size: int, huge: bool) -> mmap.mmap:
        buf = anon(size, huge)
        view = memoryview(buf)[:size]
        got = 0
        while got < size:
            k = f.readinto(view[got:])
            if not k:
                raise PlanError(f"{path}: truncated weights")
            got += k
        view.release()
        return buf

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "HostWeights":
        """Pack in-memory arrays (64-byte aligned) — for running graphs that are not plans."""
        self = cls.__new__(cls)
        self.offsets, at = {}, 0
        for k, a in arrays.items():
            self.offsets[k] = at
            at += -(-a.nbytes // 64) * 64
        self.buf = anon(max(at, 64))
        self.start, self.mode = 0, "arrays"
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
        return np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.start + off).reshape(shape)
