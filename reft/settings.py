"""Every environment knob reft reads, declared once: name, type, default and meaning.

Read through the functions below (each reads the environment when called, so tests and tools may
set a variable at run time). `reft --help` and docs point here; nothing else in reft reads
os.environ for its own settings.

  REFT_DEBUG      int, 0     1: the CLIs print the traceback of an unexpected error (exit 2) instead of one line
  REFT_WEIGHTS    str, auto  cpu backend: how plan weights reach memory. map: read-only mmap of the file
                             (no copy); read: read into anonymous (huge-page) memory; auto: map, and read
                             when the kernel backs under half the mapping with 2 MiB pages
  REFT_CACHE_DIR  path       compiled kernel cache: cpu libraries, cuda cubins (in cuda/) [~/.cache/reft/kernels]
  REFT_CUDA_GRAPHS int, 64   cuda: steps of at most this many tokens replay as CUDA graphs; 0: off
  REFT_CUDA_SYNC  int, 0     cuda: 1 waits after every launch and names a failing kernel (graphs off)
  CXX             path       cpu backend: the host C++ compiler [g++, then c++]
  REFT_DUMP       path       as `reftc compile --dump DIR`: write numbered IR dumps, kernels and the memory plan
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Knob:
    name: str
    type: type
    default: object
    doc: str


KNOBS = {k.name: k for k in [
    Knob("REFT_DEBUG", int, 0, "print tracebacks of unexpected errors"),
    Knob("REFT_WEIGHTS", str, "auto", "cpu weights: map | read | auto"),
    Knob("REFT_CACHE_DIR", Path, None, "compiled kernel cache [~/.cache/reft/kernels]"),
    Knob("CXX", str, None, "host C++ compiler [g++, c++]"),
    Knob("REFT_CUDA_GRAPHS", int, 64, "cuda: steps of at most this many tokens replay as CUDA graphs; 0: off"),
    Knob("REFT_CUDA_SYNC", int, 0, "cuda: 1 waits after every launch and names a failing kernel (graphs off)"),
    Knob("REFT_DUMP", Path, None, "dump folder, as --dump"),
]}
WEIGHT_MODES = ("auto", "map", "read")


def _raw(name: str) -> str | None:
    v = os.environ.get(name)
    return v if v not in (None, "") else None


def debug() -> int:
    v = _raw("REFT_DEBUG")
    if v is None:
        return 0
    try:
        return int(v)
    except ValueError:
        return 1   # any other non-empty value turns it on


def weights_mode() -> str:
    v = (_raw("REFT_WEIGHTS") or "auto").lower()
    return v if v in WEIGHT_MODES else "auto"


def cache_dir() -> Path:
    v = _raw("REFT_CACHE_DIR")
    return Path(v) if v else Path.home() / ".cache" / "reft" / "kernels"


def cxx() -> str | None:
    return _raw("CXX")


def dump_dir() -> Path | None:
    v = _raw("REFT_DUMP")
    return Path(v) if v else None


def cuda_graphs() -> int:
    """REFT_CUDA_GRAPHS: the largest step (tokens) replayed as a CUDA graph; 0 turns graphs off."""
    v = _raw("REFT_CUDA_GRAPHS")
    try:
        return max(0, int(v)) if v is not None else 64
    except ValueError:
        return 64


def cuda_sync() -> bool:
    """REFT_CUDA_SYNC=1: synchronize after every cuda launch, so a failing kernel is named."""
    return _raw("REFT_CUDA_SYNC") not in (None, "0")
