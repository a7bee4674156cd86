"""The plan directory format, shared by the compiler (writer) and the runtime (reader).

    plan/
      manifest.json      format version, model, dtypes, backend + target, entry points and
                         their signatures, KV layout, pass pipeline, weight files
      graphs/<entry>.ir  final IR of each entry point (text form)
      kernels/           generated sources and binaries, named by content hash (codegen backends)
      weights/           safetensors after compile-time transforms
      tokenizer/         tokenizer.json, tokenizer_config.json, generation_config.json
      dumps/             only with --dump: IR after each pass, final.dot
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import PlanError

FORMAT = "reft-plan"
FORMAT_VERSION = 1


@contextmanager
def atomic_dir(out: str | Path):
    """Yield a temporary directory beside `out`; on success it replaces `out` in one rename.

    On failure the temporary directory is removed and whatever was at `out` is untouched.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").exists()):
            shutil.rmtree(tmp, ignore_errors=True)
            raise PlanError(f"{out} exists and is not a reft plan; refusing to overwrite it")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def signature(graph) -> dict:
    """An entry point's inputs and outputs: name -> dtype and shape (symbolic dims by name)."""
    spec = lambda v: {"dtype": v.dtype, "shape": list(v.shape)}  # noqa: E731
    return {"inputs": {n.name: spec(n.out) for n in graph.inputs()},
            "outputs": {k: spec(v) for k, v in graph.outputs.items()}}


def build_manifest(*, source, cfg, n_params: int, options, graphs: dict, backend: dict, quantization, memory,
                   passes: list, kv, weight_bytes: int, n_tensors: int, writable: dict) -> dict:
    """The manifest of a compiled plan (the one place its fields are put together).

    source: the frontends' ModelSource; options: the CompileOptions; graphs: entry -> final Graph;
    backend: the backend's compile record; writable: entry -> params that entry updates in place.
    """
    from . import __version__
    from .passes.add_lora_slots import lora_layout

    return {
        "reft_version": __version__,
        "task": options.task,   # generate (forward returns logits) | embed (hidden states) | train
        "model": {"architecture": source.architecture, "family": source.family_name,
                  "config": dataclasses.asdict(cfg), "params": n_params, "source": str(source.path.resolve()),
                  "model_def": _model_def_record(source.model_def), **source.provenance},
        "context_length": getattr(cfg, "max_position_embeddings", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "dtypes": {"weights": options.dtype, "compute": "float32", "activations": "float32"},
        "quantization": quantization,
        "backend": backend,
        "max_batch_tokens": options.max_batch_tokens,
        "memory": memory,
        "entry_points": {e: {"graph": f"graphs/{e}.ir", **signature(g),
                             **({"writable": sorted(writable[e])} if writable.get(e) else {})}
                         for e, g in graphs.items()},
        "kv_cache": kv,
        "lora": lora_layout(graphs["forward"]) if "forward" in graphs else None,
        "passes": passes,
        "weights": {"files": ["weights/model.safetensors"], "bytes": weight_bytes, "tensors": n_tensors},
        "ops": graphs.get("forward", next(iter(graphs.values()))).op_counts(),
    }


def _model_def_record(model_def) -> dict | None:
    if not model_def:
        return None
    p = Path(model_def)
    return {"path": str(p.resolve()), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}


def write_manifest(plan_dir: Path, manifest: dict) -> None:
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    (plan_dir / "manifest.json").write_text(json.dumps(body, indent=2) + "\n")


def read_manifest(plan_dir: str | Path) -> dict:
    plan_dir = Path(plan_dir)
    path = plan_dir / "manifest.json"
    if not plan_dir.is_dir():
        raise PlanError(f"{plan_dir}: no such plan directory")
    if not path.is_file():
        raise PlanError(f"{plan_dir}: not a reft plan (no manifest.json)")
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise PlanError(f"{path}: not a reft plan manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise PlanError(f"{plan_dir}: plan format version {m.get('format_version')} is not supported by this"
                        f" reft (reads version {FORMAT_VERSION}); recompile it with `reftc compile`")
    return m
