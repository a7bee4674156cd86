"""LoRA: give the target projections a trainable low-rank update, y = W x (+ b) + B (s * A d(x)).

For every `linear` whose weight is `<module>.weight` with <module>'s last name among the targets
(q_proj, v_proj, ... as PEFT's `target_modules` matches them):

  y = linear(x, W[, b])  ->  y + linear(mul(linear(d(x), A), s), B)

  A  `<module>.lora_A.weight` float32 [r, in]: kaiming-uniform with a = sqrt(5), PEFT's init of
     lora_A (nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in))), drawn from (seed, module name), so
     one module's init does not depend on which others are adapted
  B  `<module>.lora_B.weight` float32 [out, r]: zeros, so training starts from the base model
  s  `lora.scaling` float32[]: alpha / r (rsLoRA: alpha / sqrt(r)), one frozen scalar param (the IR
     has no constants), applied to the r-wide intermediate where it costs least
  d  LoRA dropout, as PEFT's lora_dropout (the base path W x is untouched): with dropout p > 0,
     d(x) = dropout(x, key) {p, stream = crc32(module)} (reft/ir/ops/dropout.py) reading the graph
     input `lora.dropout_key` int64[], which the runtime sets per micro-batch; each module draws its
     own mask. add_lora_eval (the eval_loss entry) leaves dropout out: d(x) = x.

QLoRA: with ctx.options["quantized_weights"] (a checkpoint mapping with quantized_dtype(name) and
raw(name): a GGUF's weights), a frozen weight the checkpoint stores in llama.cpp blocks and that
only weight-matrix inputs read (linear, embedding: OpDef.quantized_input) stays in its blocks; its
forward and input-gradient matmuls dequantize on the fly. Weights the loss reads (the LM head, a
tied embedding) stay float32.

Names are PEFT's without its `base_model.model.` prefix (runtime/train/lora_adapter.py writes
the adapter). Runs after `attach_loss` (the LM head is then the loss op, not a linear, so it is
never adapted) and before `differentiate`.

Options: ctx.options["lora"], a LoraConfig; absent = the pass does nothing. It sets
ctx.options["trainable"] to the adapter tensors: only they train. Tensors already in ctx.weights
(a resumed run's adapter) are kept. Counts `adapted`, `dropout`, `quantized_base`. A target the
model lacks, or a dropout outside [0, 1), is a ReftError.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from ..errors import ReftError
from ..ir import Graph, Node, TensorType, ops
from ..ir.ops.dropout import KEY
from .context import PassContext
from .rewrite import make

SCALING = "lora.scaling"
DROPOUT_KEY = "lora.dropout_key"
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    seed: int = 0
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def check(self) -> None:
        if self.r < 1:
            raise ReftError(f"--lora-rank must be at least 1, got {self.r}")
        if not self.alpha > 0:
            raise ReftError(f"--lora-alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ReftError(f"--lora-dropout {self.dropout}: must be at least 0 and below 1")
        if not self.targets:
            raise ReftError("--lora-targets names no module")


def lora_a_init(module: str, r: int, n_in: int, seed: int) -> np.ndarray:
    """PEFT's lora_A init: kaiming_uniform_(a=sqrt(5)) on [r, in], i.e. U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(n_in)
    rng = np.random.default_rng([seed, zlib.crc32(module.encode())])
    return rng.uniform(-bound, bound, (r, n_in)).astype(np.float32)


def linear_modules(graph: Graph) -> dict[str, Node]:
    """<module> -> the linear node whose weight param is `<module>.weight` (the LM head making an
    output is not one: training turns it into the loss)."""
    outputs = {id(v) for v in graph.outputs.values()}
    out = {}
    for n in graph.nodes:
        if n.op == "linear" and n.inputs[1].node.op == "param" and n.inputs[1].node.name.endswith(".weight") \
                and id(n.out) not in outputs:
            out[n.inputs[1].node.name[:-len(".weight")]] = n
    return out


def adapted_modules(graph: Graph, targets) -> dict[str, Node]:
    """The linears the targets name (module -> node); a target the model lacks is a ReftError."""
    modules = linear_modules(graph)
    short = {m.rsplit(".", 1)[-1] for m in modules}
    missing = [t for t in targets if t not in short]
    if missing:
        raise ReftError(f"LoRA target module {missing[0]!r} is not in the model; its linear modules are"
                        f" {', '.join(sorted(short))}")
    return {m: n for m, n in modules.items() if m.rsplit(".", 1)[-1] in targets}


def add_lora(graph: Graph, ctx: PassContext) -> Graph:
    """The pass (module docstring), for graphs that train."""
    return _add_lora(graph, ctx, dropout=True)


def add_lora_eval(graph: Graph, ctx: PassContext) -> Graph:
    """add_lora for graphs that do not train (the eval_loss entry): no dropout."""
    return _add_lora(graph, ctx, dropout=False)


def _add_lora(graph: Graph, ctx: PassContext, dropout: bool) -> Graph:
    cfg: LoraConfig | None = ctx.options.get("lora")
    if cfg is None:
        return graph
    cfg.check()
    chosen = adapted_modules(graph, cfg.targets)
    if SCALING not in ctx.weights:
        ctx.weights.define(SCALING, lambda: np.array(cfg.scale, np.float32))
    params: list[Node] = [Node("param", [], {"name": SCALING}, [TensorType((), "float32")])]
    s = params[0].out
    key = Node("input", [], {"name": DROPOUT_KEY}, [KEY]) if dropout and cfg.dropout > 0 else None
    trainable = []
    for module, lin in chosen.items():
        x, w = lin.inputs[0], lin.inputs[1]
        n_out, n_in = w.shape
        a_name, b_name = module + A_SUFFIX, module + B_SUFFIX
        if a_name not in ctx.weights:
            ctx.weights.define(a_name, lambda m=module, k=n_in: lora_a_init(m, cfg.r, k, cfg.seed))
        if b_name not in ctx.weights:
            ctx.weights.define(b_name, lambda shape=(n_out, cfg.r): np.zeros(shape, np.float32))
        a = Node("param", [], {"name": a_name}, [TensorType((cfg.r, n_in), "float32")])
        b = Node("param", [], {"name": b_name}, [TensorType((n_out, cfg.r), "float32")])
        params += [a, b]
        trainable += [a_name, b_name]
        new = []
        if key is not None:                                    # PEFT's lora_dropout on the adapter's input
            new.append(make("dropout", [x, key.out], p=float(cfg.dropout), stream=zlib.crc32(module.encode())))
            x = new[-1].out
            ctx.count("dropout")
        down = make("linear", [x, a.out])                      # (T, r)
        scaled = make("mul", [down.out, s])
        up = make("linear", [scaled.out, b.out])               # (T, out)
        total = make("add", [lin.out, up.out])
        graph.replace_uses(lin.out, total.out)                 # before `total` joins the graph
        at = graph.nodes.index(lin) + 1
        graph.nodes[at:at] = new + [down, scaled, up, total]
        ctx.count("adapted")
    if key is not None:
        last_input = max(i for i, n in enumerate(graph.nodes) if n.op == "input")
        graph.nodes.insert(last_input + 1, key)
    first = next((i for i, n in enumerate(graph.nodes) if n.op not in ("input", "param")), len(graph.nodes))
    graph.nodes[first:first] = params
    ctx.options["trainable"] = trainable
    keep_base_quantized(graph, ctx, set(trainable))
    return graph


def keep_base_quantized(graph: Graph, ctx: PassContext, trainable: set[str]) -> None:
    """QLoRA (module docstring): frozen weights in llama.cpp blocks that only weight-matrix inputs
    read become quantized params bound to the checkpoint's raw block rows."""
    source = ctx.options.get("quantized_weights")
    qdtype = getattr(source, "quantized_dtype", None)
    if qdtype is None:
        return
    users = graph.users()
    for n in graph.params():
        if n.name in trainable or n.name not in source:
            continue
        dt, reads = qdtype(n.name), users.get(id(n.out), [])
        if dt and all(ops.get(u.op).quantized_input == u.inputs.index(n.out) for u in reads):
            n.out.type = TensorType(n.out.shape, dt)
            ctx.weights.define(n.name, lambda name=n.name: source.raw(name))
            ctx.count("quantized_base")
