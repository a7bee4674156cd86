"""`reftc compile`: model folder -> IR -> passes -> plan directory.

Steps: open the model through its frontend (one ModelSource record for a HF folder or a GGUF
file), build the entry graphs with the family's definition (`forward`, and any ENTRY_POINTS it
declares), run the --task passes on `forward` (pipeline.TASKS: `embed` makes it return hidden
states), bind their params to the checkpoint (names and shapes must agree; a base-model checkpoint's
names without the `model.` prefix are read as the family's), run the shared pass pipeline plus the
backend's own passes, let the backend (asked from the registry by name) compile the entry graphs,
then write the plan into a temporary directory that is renamed into place only when complete.
The manifest is built by reft/plan.py.

`compile_train_plan` does the same for `reft train`: the forward graph through the TRAIN pipeline
(loss, LoRA, autodiff) and the optimizer pass, float32 master weights, and the parameters the
optimizer updates declared writable in the manifest.
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import backends, settings
from .backends import BackendOptions
from .errors import ModelError, ReftError
from .frontends.base_model import base_model_view
from .frontends.safetensors import write_safetensors
from .frontends.source import ASSETS, bundled_models, open_source, resolve_model  # noqa: F401
from .ir import Graph, GraphBuilder, ops, print_graph
from .ir.types import FLOAT_DTYPES, TensorType
from .passes.context import PassContext, WeightStore
from .passes.manager import PassManager
from .passes.pipeline import PIPELINE, TASKS
from .plan import atomic_dir, build_manifest, read_manifest, signature, write_manifest  # noqa: F401
from .progress import progress_bar

DTYPES = ("float32", "bfloat16", "float16")


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
    qdtype = getattr(weights, "quantized_dtype", None)
    if qdtype is None:
        return
    users = graph.users()
    for n in graph.params():
        dt = qdtype(n.name)
        if dt and all(ops.get(u.op).quantized_input == u.inputs.index(n.out) for u in users.get(id(n.out), [])):
            n.out.type = TensorType(n.out.shape, dt)
            store.define(n.name, lambda name=n.name: weights.raw(name))


def quantization_record(graph: Graph, quant: str | None, group_size: int | None, gguf) -> dict | None:
    """The manifest's account of which weights are quantized and how (shown by `reftc inspect`)."""
    from .passes.quantize_weights import lm_head

    params = {n.name: n.out.dtype for n in graph.params() if n.out.type.rank >= 2}   # matrices, expert stacks
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


def kv_layout(graph: Graph, page_size: int) -> dict | None:
    """The manifest's kv_cache record: one [NP, page_size, kv_heads, head_dim] array per input, K and V
    per layer; a latent cache (MLA: `kv_cache.{i}.latent`, one [latent; rope key] row per token, no V)
    adds `latent` = {kv_lora_rank, rope_dim}."""
    caches = [n for n in graph.inputs() if n.name.startswith("kv_cache.")]
    if not caches:
        return None
    t = caches[0].out.type
    out = {"page_size": page_size, "num_layers": len({n.name.split(".")[1] for n in caches}), "kv_heads": t.shape[2],
           "head_dim": t.shape[3], "dtype": t.dtype, "inputs": [n.name for n in caches]}
    readers = [u for u in graph.nodes if u.op == "paged_latent_attention"]
    if readers:
        C = readers[0].inputs[0].type.shape[2]
        out["latent"] = {"kv_lora_rank": C, "rope_dim": t.shape[3] - C}
    return out


@dataclass(frozen=True)
class CompileOptions:
    """Everything `reftc compile` takes besides the model and the output folder."""
    backend: str | None = None          # a name in reft.backends.names(); None = the best for this machine
    dtype: str | None = None            # storage dtype of float weights (None: the backend's default, float32 on cpu)
    dump_dir: str | Path | None = None  # --dump (or REFT_DUMP)
    model_def: str | Path | None = None
    page_size: int = 16
    max_batch_tokens: int = 512
    progress: bool = True
    quant: str | None = None
    group_size: int = 32
    quant_head: bool = False
    kv_dtype: str | None = None         # None: the backend's default (float32 on cpu)
    calibrate: str | Path | None = None
    target: str | None = None           # backend option: cpu instruction set, or cuda architecture
    task: str = "generate"              # --task: a key of passes.pipeline.TASKS (train plans record "train")
    deterministic: bool = False         # --deterministic: batch-invariant kernels (BackendOptions.deterministic)
    max_loras: int = 0                  # --max-loras: LoRA adapter slots served per request (0: none)
    max_lora_rank: int = 16
    lora_targets: tuple[str, ...] | None = None   # None: every projection (passes/add_lora_slots.py)
    # more devices the plan runs on: (backend, its target) pairs, each compiled with these same
    # options into devices/<backend>/ (a whole plan of its own), run by `reft run PLAN --device NAME`
    devices: tuple[tuple[str, str | None], ...] = ()

    def backend_options(self) -> BackendOptions:
        return BackendOptions(target=self.target, max_batch_tokens=self.max_batch_tokens,
                              dtype=self.dtype or "float32", progress=self.progress, deterministic=self.deterministic)

    def resolve(self, backend) -> "CompileOptions":
        """dtype and kv_dtype the user left unset take the backend's defaults (float32 elsewhere)."""
        d = getattr(backend, "option_defaults", lambda o: {})(self)
        return dataclasses.replace(self, dtype=self.dtype or d.get("dtype", "float32"),
                                   kv_dtype=self.kv_dtype or d.get("kv_dtype", "float32"))

    def check(self) -> None:
        """Bad option values fail before any work."""
        if self.dtype not in DTYPES:
            raise ReftError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.kv_dtype not in DTYPES:
            raise ReftError(f"unknown KV-cache dtype {self.kv_dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.task not in TASKS:
            raise ReftError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.max_loras < 0 or self.max_lora_rank < 1:
            raise ReftError(f"--max-loras must be >= 0 and --max-lora-rank >= 1, got {self.max_loras},"
                            f" {self.max_lora_rank}")
        if self.quant:
            from .passes.quantize_weights import quant_dtype

            quant_dtype(self.quant, self.group_size)


def model_config(source):
    """The family's Config of a ModelSource; a config that does not fit is a ModelError."""
    try:
        return source.family.Config.from_hf(source.config)
    except KeyError as e:
        raise ModelError(f"{source.where}: missing key {e}") from None
    except (ValueError, TypeError) as e:
        raise ModelError(f"{source.where}: {e}") from None


def default_backend() -> str:
    """The best backend for this machine: cpu (C++ codegen) wherever a C++ compiler exists."""
    return backends.default().name


def build_entries(family, cfg) -> dict[str, Graph]:
    """The plan's entry graphs: `forward`, then any the family declares in ENTRY_POINTS
    (name -> build(cfg, builder)), all over the same weights."""
    graphs = {"forward": build_graph(family, cfg)}
    for name, build in getattr(family, "ENTRY_POINTS", {}).items():
        b = GraphBuilder(name)
        build(cfg, b)
        graphs[name] = b.graph
    return graphs


def compile_model(model: str | Path, out: str | Path, options: CompileOptions | None = None, **kw) -> Path:
    """Compile `model` (a folder, a .gguf file or a bundled name) into the plan directory `out`.
    Options come as a CompileOptions record, or as its fields by keyword."""
    opts = dataclasses.replace(options or CompileOptions(), **kw)
    if opts.dump_dir is None and settings.dump_dir() is not None:
        opts = dataclasses.replace(opts, dump_dir=settings.dump_dir())
    backend = backends.get(opts.backend) if opts.backend else backends.default()
    others = _device_options(opts, backend.name)
    opts = opts.resolve(backend)
    backend.check_options(opts.backend_options())
    opts.check()
    source = open_source(model, opts.model_def)
    cfg = model_config(source)
    try:
        graphs = build_entries(source.family, cfg)
    except (TypeError, ValueError, KeyError) as e:
        raise ModelError(f"{source.model_def or source.where}: building the graph failed: {e}") from None
    task_pm = PassManager(TASKS[opts.task])
    graphs["forward"] = task_pm.run(graphs["forward"], PassContext())
    weights = base_model_view(source.weights, graphs["forward"])
    n_params = bind_weights(graphs["forward"], weights, str(source.path))
    for g in list(graphs.values())[1:]:
        bind_weights(g, weights, str(source.path))
    tokenizer = source.tokenizer

    store = WeightStore(weights)
    for g in graphs.values():
        keep_quantized(g, weights, store)
    calibration_ids = _calibration_ids(opts.calibrate, tokenizer, opts.quant) if opts.calibrate else None
    ctx = PassContext(store, options={"weight_dtype": opts.dtype, "page_size": opts.page_size,
                                      "max_batch_tokens": opts.max_batch_tokens, "quant": opts.quant,
                                      "group_size": opts.group_size, "quant_head": opts.quant_head,
                                      "kv_dtype": opts.kv_dtype, "calibration_ids": calibration_ids,
                                      "max_loras": opts.max_loras, "max_lora_rank": opts.max_lora_rank,
                                      "lora_targets": opts.lora_targets})
    with atomic_dir(out) as tmp:
        dumps = tmp / "dumps" if opts.dump_dir else None
        records = run_pipelines(graphs, {e: PIPELINE + list(backend.passes) for e in graphs}, ctx, dumps)
        records["forward"][:0] = task_pm.records
        write_plan(tmp, source=source, cfg=cfg, n_params=n_params, options=opts, graphs=graphs, records=records,
                   ctx=ctx, backend=backend,
                   quantization=quantization_record(graphs["forward"], opts.quant, opts.group_size,
                                                    source.format == "gguf"),
                   kv=kv_layout(graphs["forward"], opts.page_size))
        if opts.dump_dir:
            shutil.copytree(dumps, opts.dump_dir, dirs_exist_ok=True)
        if others:   # inside the same atomic directory: the plan appears with all its devices or not at all
            for name, sub in others.items():
                compile_model(model, tmp / "devices" / name, sub)
            m = read_manifest(tmp)
            m["devices"] = {name: f"devices/{name}" for name in others}
            write_manifest(tmp, m)
    return Path(out)


def _device_options(opts: CompileOptions, main: str) -> dict[str, CompileOptions]:
    """The compile options of each extra device (CompileOptions.devices), checked before any work:
    known backends, each once and not the plan's own, options that backend accepts; dtypes left
    unset take each backend's own default."""
    out: dict[str, CompileOptions] = {}
    for name, target in opts.devices:
        be = backends.get(name)   # an unknown name is the registry's one-line error
        if name == main or name in out:
            raise ReftError(f"backend {name} is named twice; give each device once")
        sub = dataclasses.replace(opts, backend=name, target=target, devices=(), dump_dir=None)
        be.check_options(sub.resolve(be).backend_options())
        out[name] = sub
    return out


def run_pipelines(graphs: dict[str, Graph], pipelines: dict[str, list], ctx: PassContext, dumps: Path | None) -> dict:
    """Run each entry graph through its pipeline (in place in `graphs`); returns entry -> pass records.
    Dumps of the first entry go to `dumps`, the others' to `dumps/<entry>`."""
    records = {}
    for i, (entry, g) in enumerate(graphs.items()):
        pm = PassManager(pipelines[entry], dump_dir=None if dumps is None else dumps if i == 0 else dumps / entry)
        graphs[entry] = pm.run(g, ctx)
        records[entry] = pm.records
    return records


def write_plan(tmp: Path, *, source, cfg, n_params: int, options: CompileOptions, graphs: dict[str, Graph],
               records: dict, ctx: PassContext, backend, quantization, kv) -> None:
    """Everything of a plan directory but the dumps, into `tmp`: the final graphs, what the backend
    compiles, the weights in its layout, the tokenizer and the manifest. An entry's writable params
    are the family's WRITABLE ones plus those a pass recorded (add_optimizer's updates)."""
    dumps = tmp / "dumps" if options.dump_dir else None
    (tmp / "graphs").mkdir()
    for entry, g in graphs.items():
        (tmp / "graphs" / f"{entry}.ir").write_text(print_graph(g))
    (tmp / "kernels").mkdir()
    backend_record = backend.compile(graphs, tmp / "kernels", options.backend_options(),
                                     ctx.artifacts.get("memory_plans"))
    if dumps:
        for entry, rec in backend_record.get("entries", {}).items():
            shutil.copy(tmp / rec["source"], dumps / f"{entry}.cpp")
    (tmp / "weights").mkdir()
    params = plan_params(graphs)
    weight_bytes = _write_weights(params, ctx.weights, tmp / "weights" / "model.safetensors", options.progress,
                                  backend.weight_layout(backend_record))
    source.tokenizer.save_to(tmp / "tokenizer")
    declared, recorded = getattr(source.family, "WRITABLE", {}), ctx.artifacts.get("writable", {})
    writable = {e: sorted({*declared.get(e, ()), *recorded.get(e, ())}) for e in graphs}
    write_manifest(tmp, build_manifest(
        source=source, cfg=cfg, n_params=n_params, options=options, graphs=graphs, backend=backend_record,
        quantization=quantization, memory=ctx.artifacts.get("memory"),
        passes=[dataclasses.asdict(r) for r in next(iter(records.values()))], kv=kv, weight_bytes=weight_bytes,
        n_tensors=len(params), writable=writable))


# -- training plans (reft train) ------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainPlanOptions:
    """What `reft train` compiles: its entry points, what trains, and the optimizer.

    Entries: `train_step` (forward + loss + backward + AdamW, one call per optimizer step), or with
    `accumulate` the pair `train_grad` (forward + loss + backward: outputs loss and grad.<param>) and
    `apply_update` (inputs grad.<param>: the gradients the runtime summed over the micro-batches;
    clipping + AdamW); with `eval` also `eval_loss` (forward + loss).
    """
    backend: str | None = None
    trainable: tuple[str, ...] | None = None     # None = every float parameter (full); LoRA decides its own
    lora: object = None                          # a passes.add_lora.LoraConfig
    optimizer: object = None                     # a passes.add_optimizer.AdamW
    gradient_checkpointing: bool = False
    accumulate: bool = False
    eval: bool = False
    max_batch_tokens: int = 512
    threads: int | None = None
    dump_dir: str | Path | None = None
    progress: bool = False

    def compile_options(self) -> CompileOptions:
        return CompileOptions(backend=self.backend, dtype="float32", dump_dir=self.dump_dir,
                              max_batch_tokens=self.max_batch_tokens, progress=self.progress, task="train")


def train_forward(source, cfg, name: str, weights) -> tuple[Graph, int]:
    """The family's forward graph named `name`, bound to the checkpoint, every float param float32
    (training keeps fp32 master weights; block-quantized GGUF tensors are dequantized)."""
    b = GraphBuilder(name)
    source.family.build(cfg, b)
    n = bind_weights(b.graph, weights, str(source.path))
    for p in b.graph.params():
        p.out.type = TensorType(p.out.shape, "float32")
    return b.graph, n


def update_graph(grads: dict[str, TensorType]) -> Graph:
    """The `apply_update` entry before add_optimizer: each trainable param, and its gradient as an input."""
    b = GraphBuilder("apply_update")
    for name, t in grads.items():
        b.param(name, t.shape)
        b.output("grad." + name, b.input("grad." + name, t.shape, "float32"))
    return b.graph


def compile_train_plan(source, out: str | Path, options: TrainPlanOptions, weights=None) -> Path:
    """Compile the training entry points of `source` (a ModelSource) into the plan directory `out`.
    `weights` (name -> array) replace the checkpoint's tensors and the fresh optimizer state / adapter
    init by name (a resumed run's trained params, AdamW moments and LoRA tensors)."""
    from .passes.add_optimizer import AdamW
    from .passes.pipeline import EVAL, OPTIMIZER, TRAIN

    opts = options
    copts = opts.compile_options()
    backend = backends.get(opts.backend) if opts.backend else backends.default()
    backend.check_options(copts.backend_options())
    cfg = model_config(source)
    first = "train_grad" if opts.accumulate else "train_step"
    graphs, n_params = {}, 0
    for entry in (first, "eval_loss") if opts.eval else (first,):
        graphs[entry], n_params = train_forward(source, cfg, entry, source.weights)
    store = WeightStore(source.weights)
    for p in graphs[first].params():
        if source.weights.info(p.name)[0] != "float32":
            store.transform(p.name, lambda a: np.asarray(a, np.float32))
    for name, a in (weights or {}).items():
        store.define(name, lambda a=a: a)
    ctx = PassContext(store, options={"trainable": opts.trainable, "lora": opts.lora,
                                      "quantized_weights": source.weights,   # LoRA keeps a GGUF base in its blocks
                                      "optimizer": opts.optimizer or AdamW(),
                                      "gradient_checkpointing": opts.gradient_checkpointing,
                                      "max_batch_tokens": opts.max_batch_tokens})
    tail = list(backend.passes)
    with atomic_dir(out) as tmp:
        dumps = tmp / "dumps" if opts.dump_dir else None
        pipelines = {first: TRAIN + ([] if opts.accumulate else OPTIMIZER) + tail, "eval_loss": EVAL + tail}
        records = run_pipelines(graphs, pipelines, ctx, dumps)
        if opts.accumulate:
            grads = {k[len("grad."):]: v.type for k, v in graphs[first].outputs.items() if k.startswith("grad.")}
            upd = {"apply_update": update_graph(grads)}
            records.update(run_pipelines(upd, {"apply_update": OPTIMIZER + tail}, ctx,
                                         None if dumps is None else dumps / "apply_update"))
            graphs.update(upd)
        write_plan(tmp, source=source, cfg=cfg, n_params=n_params, options=copts, graphs=graphs, records=records,
                   ctx=ctx, backend=backend, quantization=None, kv=None)
        if opts.dump_dir:
            shutil.copytree(dumps, opts.dump_dir, dirs_exist_ok=True)
    return Path(out)


def plan_params(graphs: dict[str, Graph]) -> list:
    """Every weight of the plan's entry graphs, once; an entry may not see a weight in another type."""
    seen: dict[str, object] = {}
    for entry, g in graphs.items():
        for n in g.params():
            other = seen.setdefault(n.name, n)
            if other.out.type != n.out.type:
                raise ReftError(f"entry {entry}: weight {n.name} is {n.out.type} here but {other.out.type}"
                                " in another entry point")
    return list(seen.values())


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


def _write_weights(params: list, store: WeightStore, path: Path, progress: bool, layouts: dict) -> int:
    """Stream every weight of the final graphs to one safetensors file, in the physical layout the
    backend chose for it (e.g. packed for the cpu kernels). Returns the bytes of weights."""
    items = []
    for n in params:
        if n.name in layouts:
            lay = layouts[n.name]
            items.append((n.name, n.out.dtype, lay.shape(n.out.shape), lambda name=n.name, lay=lay: lay.pack(store[name])))
        elif n.out.type.quantized:   # raw block rows
            items.append((n.name, "uint8", n.out.type.storage_shape(), lambda name=n.name: store[name]))
        else:
            items.append((n.name, n.out.dtype, n.out.shape, lambda name=n.name: store[name]))
    total = sum(TensorType(tuple(s), d).nbytes() for _, d, s, _ in items)
    with progress_bar(total, "weights", enabled=progress) as bar:
        write_safetensors(path, items, metadata={"format": "reft"}, progress=lambda name, nb: bar.update(nb))
    return total
