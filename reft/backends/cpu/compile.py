"""Render the forward function from templates and compile it with the host C++ compiler.

Binaries are named by the hash of their source and flags; a per-user cache
(~/.cache/reft/kernels, or $REFT_CACHE_DIR) avoids recompiling an identical source.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jinja2

from ... import __version__, settings
from ...errors import ReftError
from .lower import Lowered
from .targets import compile_flags, compiler_prefix, get as get_target

TEMPLATES = Path(__file__).parent / "templates"
HEADERS = ["common.h", "simd.h", "linear.h", "quant.h", "qkv_rope.h", "attention.h", "rows.h", "elementwise.h",
           "optim.h"]
# headers included only where an entry's graph uses them (Lowered.headers): the training ops, and
# the mixture-of-experts kernels (and DeepSeek's grouped router), the LoRA adapter slots, latent attention
OPTIONAL_HEADERS = ["grad.h", "attention_grad.h", "loss.h", "moe.h", "lora.h", "router_grouped.h", "mla.h"]
FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno", "-Werror=vla"]


def render(low: Lowered, entry: str, target: str, tune: dict | None = None) -> str:
    """The C++ source of one entry point: `extern "C" int reft_<entry>(...)` and its kernels, compiled
    with `tune` (targets.tuning; None: the target's own constants)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    return env.get_template("forward.cpp.j2").render(
        version=__version__, entry=entry, target=get_target(target).describe(), tuning=tune or get_target(target).tuning,
        headers=HEADERS + [h for h in OPTIONAL_HEADERS if h in low.headers], constants=low.constants,
        scratch_floats=low.scratch_floats, symbols=low.symbols, calls=low.calls)


def rename_exports(source: str, entry: str) -> str:
    """The source of a second (third, ...) entry point of one library: its per-source exports get the
    entry's suffix (reft_init_<entry>, reft_scratch_floats_<entry>, ...) so the sources link together."""
    return (f"// entry {entry}: per-source exports renamed to link beside the first entry point\n"
            f"#define reft_init reft_init_{entry}\n#define reft_scratch_floats reft_scratch_floats_{entry}\n"
            f"#define reft_set_deterministic reft_set_deterministic_{entry}\n"
            + source)


def cache_dir() -> Path:
    return settings.cache_dir()


def compiler(target: str | None = None) -> str:
    """The host's C++ compiler ($CXX, g++, c++), or the GNU cross compiler of a foreign target."""
    prefix = compiler_prefix(target) if target else ""
    if prefix:
        cxx = shutil.which(f"{prefix}g++")
        if not cxx:
            raise ReftError(f"cpu target {target} is cross-compiled with {prefix}g++, which is not installed"
                            f" (Debian: apt-get install g++-{prefix[:-1].replace('_', '-')})")
        return cxx
    cxx = settings.cxx() or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise ReftError("the cpu backend needs a C++ compiler (g++); install it or set CXX")
    return cxx


def build(source: str, target: str, out_dir: Path) -> tuple[Path, Path]:
    """Write <hash>.cpp and compile <hash>.so into out_dir (reusing the cache). Returns both paths."""
    srcs, lib = build_library([source], target, out_dir)
    return srcs[0], lib


def build_library(sources: list[str], target: str, out_dir: Path) -> tuple[list[Path], Path]:
    """Write each source as <hash>.cpp and link them all into one <hash>.so (named by the first
    source's hash and the others'; reusing the cache). Returns the source paths and the library."""
    cxx = compiler(target)
    flags = FLAGS + compile_flags(target)
    digests = [hashlib.sha256("\n".join([s, cxx, *flags]).encode()).hexdigest()[:20] for s in sources]
    digest = digests[0] if len(sources) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()[:20]
    srcs, lib = [out_dir / f"{d}.cpp" for d in digests], out_dir / f"{digest}.so"
    for path, text in zip(srcs, sources):
        path.write_text(text)
    cached = cache_dir() / f"{digest}.so"
    if cached.exists():
        shutil.copy(cached, lib)
        return srcs, lib
    with tempfile.TemporaryDirectory() as tmp:
        tmp_lib = Path(tmp) / lib.name
        p = subprocess.run([cxx, *flags, *map(str, srcs), "-o", str(tmp_lib)], capture_output=True, text=True)
        if p.returncode != 0:
            src = srcs[0]
            keep = cache_dir() / f"failed-{src.name}"
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, keep)
            first = next((line for line in p.stderr.splitlines() if "error" in line), p.stderr.strip()[:200])
            raise ReftError(f"C++ compilation failed: {first.strip()} (source kept in {keep})")
        shutil.copy(tmp_lib, lib)
        try:
            cache_dir().mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_lib, cached.with_suffix(".tmp"))
            os.replace(cached.with_suffix(".tmp"), cached)
        except OSError:
            pass
    return srcs, lib
