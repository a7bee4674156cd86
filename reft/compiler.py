"""`reftc compile`: model folder -> IR -> passes -> plan directory.

Steps: read config.json and pick the family (registry keyed on `architectures`), build the
forward graph with the family's definition, bind its params to the checkpoint (names and
shapes must agree), run the pass pipeline, then write the plan into a temporary directory
that is renamed into place only when complete.
"""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

from . import __version__
from .errors import ModelError, ReftError
from .frontends.architectures import find_family
from .frontends.config import load_hf_config
from .frontends.safetensors import open_weights, write_safetensors
from .frontends.tokenizer import Tokenizer
from .ir import Graph, GraphBuilder, print_graph
from .ir.types import FLOAT_DTYPES, TensorType
from .passes.context import PassContext, WeightStore
from .passes.manager import PassManager
from .passes.pipeline import pipeline_for
from .plan import atomic_dir, write_manifest
from .progress import progress_bar

BACKENDS = ("cpu", "reference")
DTYPES = ("float32", "bfloat16", "float16")


ASSETS = Path(__file__).parent / "assets"


def bundled_models() -> list[str]:
    return sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file())


def resolve_model(model: str | Path) -> Path:
    """A path, or the name of a model shipped inside reft (e.g. `stories260K`)."""
    p = Path(model)
    if not p.exists() and str(model) in bundled_models():
        return ASSETS / str(model)
    return p


def build_graph(family, cfg) -> Graph:
    b = GraphBuilder("forward")
    family.build(cfg, b)
    return b.graph


def bind_weights(graph: Graph, weights, where: str) -> int:
    """Every param must exist in the checkpoint with the shape the config implies.
    Param dtypes become the stored dtypes. Returns the parameter count."""
    total = 0
    for n in graph.params():
        if n.name not in weights:
            raise ModelError(f"{where}: weight {n.name!r} is missing from the checkpoint")
        dtype, shape = weights.info(n.name)
        if tuple(shape) != n.out.shape:
            raise ModelError(f"{where}: weight {n.name} has shape {list(shape)} but config.json implies"
                             f" {list(n.out.shape)}")
        if dtype not in FLOAT_DTYPES:
            raise ModelError(f"{where}: weight {n.name} has dtype {dtype}; float weights expected")
        n.out.type = TensorType(tuple(shape), dtype)
        total += n.out.type.numel()
    return total


def keep_quantized(graph: Graph, weights, store: WeightStore) -> None:
    """Bind block-quantized source tensors (GGUF) as quantized params, read as their raw bytes, where
    only the weight inputs of linear / embedding read them (elsewhere they are dequantized floats)."""
    from .ir.ops.registry import QUANTIZED_WEIGHT_INPUT

    qdtype = getattr(weights, "quantized_dtype", None)
    if qdtype is None:
        return
    users = graph.users()
    for n in graph.params():
        dt = qdtype(n.name)
        if dt and all(QUANTIZED_WEIGHT_INPUT.get(u.op) == u.inputs.index(n.out) for u in users.get(id(n.out), [])):
            n.out.type = TensorType(n.out.shape, dt)
            store.define(n.name, lambda name=n.name: weights.raw(name))


def quantization_record(graph: Graph, quant: str | None, group_size: int | None, gguf) -> dict | None:
    """The manifest's account of which weights are quantized and how (shown by `reftc inspect`)."""
    from .passes.quantize_weights import lm_head

    params = {n.name: n.out.dtype for n in graph.params() if n.out.type.rank == 2}
    counts: dict[str, int] = {}
    for dt in params.values():
        counts[dt] = counts.get(dt, 0) + 1
    if not quant and all(d in FLOAT_DTYPES for d in counts):
        return None
    head = lm_head(graph)
    emb = next((n.inputs[1] for n in graph.nodes if n.op == "embedding"), None)
    return {"method": quant or ("gguf" if gguf else None), "group_size": group_size if quant == "int4" else None,
            "matrices": counts, "lm_head": head.inputs[1].dtype if head else None,
            "embedding": emb.dtype if emb is not None else None}


def signature(graph: Graph) -> dict:
    spec = lambda v: {"dtype": v.dtype, "shape": list(v.shape)}  # noqa: E731
    return {"inputs": {n.name: spec(n.out) for n in graph.inputs()},
            "outputs": {k: spec(v) for k, v in graph.outputs.items()}}


def kv_layout(graph: Graph, page_size: int) -> dict | None:
    caches = [n for n in graph.inputs() if n.name.startswith("kv_cache.")]
    if not caches:
        return None
    t = caches[0].out.type
    return {"page_size": page_size, "num_layers": len(caches) // 2, "kv_heads": t.shape[2],
            "head_dim": t.shape[3], "dtype": t.dtype, "inputs": [n.name for n in caches]}


def default_backend() -> str:
    """The best backend for this machine: cpu (C++ codegen) wherever a C++ compiler exists."""
    import shutil

    return "cpu" if (shutil.which("g++") or shutil.which("c++")) else "reference"


def compile_model(model: str | Path, out: str | Path, *, backend: str | None = None, dtype: str = "float32",
                  dump_dir: str | Path | None = None, model_def: str | Path | None = None,
                  page_size: int = 16, max_batch_tokens: int = 512, progress: bool = True,
                  quant: str | None = None, group_size: int = 32, quant_head: bool = False,
                  kv_dtype: str = "float32", calibrate: str | Path | None = None, target: str | None = None) -> Path:
    model = resolve_model(model)
    backend = backend or default_backend()
    if target is not None and backend != "cpu":
        raise ReftError(f"--target selects a cpu instruction set; the {backend} backend takes none")
    if target is not None:
        from .backends.cpu.targets import get as cpu_target

        cpu_target(target)   # an unknown name is an error before any work
    if backend not in BACKENDS:
        raise ReftError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    if dtype not in DTYPES:
        raise ReftError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if kv_dtype not in DTYPES:
        raise ReftError(f"unknown KV-cache dtype {kv_dtype!r}; choose one of {', '.join(DTYPES)}")
    if quant:
        from .passes.quantize_weights import quant_dtype

        quant_dtype(quant, group_size)   # a bad --quant / --group-size fails before any work
    if not model.exists():
        raise ModelError(f"{model}: no such model directory (bundled models: {', '.join(bundled_models())})")
    gguf = _open_gguf(model, model_def) if model.is_file() and model.suffix == ".gguf" else None
    if model.is_file() and gguf is None:
        raise ModelError(f"{model}: expected a Hugging Face model directory (config.json, *.safetensors,"
                         " tokenizer.json) or a .gguf file")
    hf = gguf.hf_config if gguf else load_hf_config(model)
    family = gguf.family if gguf else find_family(hf.get("architectures"), model_def)
    where = model if gguf else model / "config.json"
    try:
        cfg = family.Config.from_hf(hf)
    except KeyError as e:
        raise ModelError(f"{where}: missing key {e}") from None
    except (ValueError, TypeError) as e:
        raise ModelError(f"{where}: {e}") from None
    source = Path(model_def) if model_def else where
    try:
        graph = build_graph(family, cfg)
    except (TypeError, ValueError, KeyError) as e:
        raise ModelError(f"{source}: building the graph failed: {e}") from None
    weights = gguf.weights if gguf else open_weights(model)
    n_params = bind_weights(graph, weights, str(model))
    tokenizer = gguf.tokenizer if gguf else Tokenizer.from_dir(model, hf)

    store = WeightStore(weights)
    keep_quantized(graph, weights, store)
    calibration_ids = _calibration_ids(calibrate, tokenizer, quant) if calibrate else None
    ctx = PassContext(store, options={"weight_dtype": dtype, "page_size": page_size,
                                      "max_batch_tokens": max_batch_tokens, "quant": quant,
                                      "group_size": group_size, "quant_head": quant_head, "kv_dtype": kv_dtype,
                                      "calibration_ids": calibration_ids})
    with atomic_dir(out) as tmp:
        dumps = tmp / "dumps" if dump_dir else None
        pm = PassManager(pipeline_for(backend), dump_dir=dumps)
        graph = pm.run(graph, ctx)
        (tmp / "graphs").mkdir()
        (tmp / "graphs" / "forward.ir").write_text(print_graph(graph))
        (tmp / "kernels").mkdir()
        backend_record = {"name": "reference", "target": "numpy"}
        if backend == "cpu":
            from .backends.cpu import compile_plan

            backend_record = compile_plan(graph, tmp / "kernels", max_tokens=max_batch_tokens, target=target)
            if dumps:
                shutil.copy(tmp / backend_record["kernel"]["source"], dumps / "forward.cpp")
        (tmp / "weights").mkdir()
        layouts = backend_record.get("layouts", {})
        weight_bytes = _write_weights(graph, ctx.weights, tmp / "weights" / "model.safetensors", progress, layouts)
        tokenizer.save_to(tmp / "tokenizer")
        write_manifest(tmp, {
            "reft_version": __version__,
            "model": {"architecture": _matched_arch(hf, family), "family": family_name(family, model_def),
                      "config": dataclasses.asdict(cfg), "params": n_params, "source": str(model.resolve()),
                      "model_def": _model_def_record(model_def),
                      **({"gguf_tensor_types": gguf.source_types} if gguf else {})},
            "context_length": getattr(cfg, "max_position_embeddings", None),
            "vocab_size": getattr(cfg, "vocab_size", None),
            "dtypes": {"weights": dtype, "compute": "float32", "activations": "float32"},
            "quantization": quantization_record(graph, quant, group_size, gguf),
            "backend": backend_record,
            "max_batch_tokens": max_batch_tokens,
            "memory": ctx.artifacts.get("memory"),
            "entry_points": {"forward": {"graph": "graphs/forward.ir", **signature(graph)}},
            "kv_cache": kv_layout(graph, page_size),
            "passes": [dataclasses.asdict(r) for r in pm.records],
            "weights": {"files": ["weights/model.safetensors"], "bytes": weight_bytes,
                        "tensors": len(graph.params())},
            "ops": graph.op_counts(),
        })
        if dump_dir:
            shutil.copytree(dumps, dump_dir, dirs_exist_ok=True)
    return Path(out)


def _calibration_ids(path, tokenizer, quant) -> list[int]:
    """The first 512 tokens of the --calibrate text file."""
    if not quant:
        raise ReftError("--calibrate only applies with --quant int8|int4")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ReftError(f"--calibrate {path}: cannot read the text ({e.__class__.__name__})") from None
    ids = tokenizer.encode(text)[:512]
    if len(ids) < 16:
        raise ReftError(f"--calibrate {path}: the text has {len(ids)} tokens; give at least 16")
    return ids


def _open_gguf(model: Path, model_def):
    """A .gguf file read by reft/frontends/gguf.py (weights dequantized to float when read)."""
    from .frontends.architectures import load_model_def
    from .frontends.gguf import open_gguf

    return open_gguf(model, load_model_def(model_def) if model_def else None)


def family_name(family, model_def) -> str:
    return Path(model_def).stem if model_def else family.__name__.split(".")[-1]


def _matched_arch(hf: dict, family) -> str:
    return next((a for a in hf.get("architectures") or [] if a in family.ARCHITECTURES), family.ARCHITECTURES[0])


def _model_def_record(model_def) -> dict | None:
    if not model_def:
        return None
    p = Path(model_def)
    return {"path": str(p.resolve()), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}


def _write_weights(graph: Graph, store: WeightStore, path: Path, progress: bool, layouts: dict) -> int:
    """Stream every weight of the final graph to one safetensors file, in the physical layout the
    backend chose for it (e.g. packed for the cpu kernels). Returns the bytes of weights."""
    from .backends.cpu import pack, packed_shape

    params = graph.params()
    items = []
    for n in params:
        if n.name in layouts:
            items.append((n.name, n.out.dtype, packed_shape(n.out.shape), lambda name=n.name: pack(store[name])))
        elif n.out.type.quantized:   # raw block rows
            items.append((n.name, "uint8", n.out.type.storage_shape(), lambda name=n.name: store[name]))
        else:
            items.append((n.name, n.out.dtype, n.out.shape, lambda name=n.name: store[name]))
    total = sum(TensorType(tuple(s), d).nbytes() for _, d, s, _ in items)
    with progress_bar(total, "weights", enabled=progress) as bar:
        write_safetensors(path, items, metadata={"format": "reft"}, progress=lambda name, nb: bar.update(nb))
    return total
