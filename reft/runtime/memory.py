"""Sizes on the command line, and how much memory the KV page pool gets.

`--kv-cache-memory` takes a size ('2GiB', '512MB', '1e9' bytes) or a fraction of the memory that is
free where the pool lives ('0.25'): host memory (MemAvailable) for the cpu backend, device memory
after the weights are loaded for the cuda one. The executable reports that figure
(`Executable.free_memory`), so the pool is sized once the plan is loaded, on its own device.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ReftError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}
DEFAULT_KV_FRACTION = 0.2


def host_available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes), else a conservative 2 GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 2 * 2**30


def _size(text: str) -> tuple[float, str] | None:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    return (float(m.group(1)), m.group(2).lower()) if m and m.group(2).lower() in _UNITS else None


def parse_bytes(text: str, option: str) -> int:
    """'4MiB', '500kB', '1048576' -> bytes (at least 1)."""
    size = _size(text)
    if size is None or int(size[0] * _UNITS[size[1]]) < 1:
        raise ReftError(f"{option} {text!r}: give a size such as 4MiB, 500kB or 1048576")
    return int(size[0] * _UNITS[size[1]])


@dataclass(frozen=True)
class KvBudget:
    """What the KV page pool may take: `memory` (--kv-cache-memory; None: room for `max_num_seqs`
    full contexts, capped at DEFAULT_KV_FRACTION of free memory). A malformed size fails here,
    before any plan is loaded."""
    memory: str | None = None
    max_num_seqs: int = 1

    def __post_init__(self):
        if self.memory is not None and _size(self.memory) is None:
            raise ReftError(f"--kv-cache-memory {self.memory!r}: give a size such as 2GiB or 512MB, or a fraction"
                            " of free memory such as 0.25")

    def bytes(self, free: int) -> int | None:
        """The pool's size in bytes given `free` bytes where it lives (None: by max_num_seqs)."""
        if self.memory is None:
            return None
        value, unit = _size(self.memory)
        return int(value * free) if not unit and 0 < value <= 1 else int(value * _UNITS[unit])

    def pages(self, page_bytes: int, page_size: int, context: int, free: int) -> int:
        """Pages in the pool, at least 2. free: bytes free where the pool will live."""
        size = self.bytes(free)
        if size is not None:
            pages = size // page_bytes
        else:
            want = self.max_num_seqs * -(-context // page_size)
            pages = min(want, int(DEFAULT_KV_FRACTION * free) // page_bytes)
        if pages < 2:
            asked = f"--kv-cache-memory {self.memory}" if self.memory else \
                f"the default KV cache ({DEFAULT_KV_FRACTION} of {free:,} free bytes)"
            raise ReftError(f"{asked} holds {pages} KV page(s) of {page_bytes:,} bytes; give more")
        return pages
