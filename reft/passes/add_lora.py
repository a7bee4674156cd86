"""LoRA: give the target projections a trainable low-rank update, y = W x (+ b) + B (s * A x).

For every `linear` whose weight is `<module>.weight` with <module>'s last name among the targets
(q_proj, v_proj, ... as PEFT's `target_modules` matches them):

  y = linear(x, W[, b])  ->  y + linear(mul(linear(x, A), s), B)

  A  `<module>.lora_A.weight` float32 [r, in]: kaiming-uniform with a = sqrt(5), PEFT's init of
     lora_A (nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in))), drawn from (seed, module name), so
     one module's init does not depend on which others are adapted
  B  `<module>.lora_B.weight` float32 [out, r]: zeros, so training starts from the base model
  s  `lora.scaling` float32[]: alpha / r (rsLoRA: alpha / sqrt(r)), one frozen scalar param (the IR
     has no constants), applied to the r-wide intermediate where it costs least

Names are PEFT's without its `base_model.model.` prefix (runtime/train/lora_adapter.py writes
the adapter). Runs after `attach_loss` (the LM head is then the loss op, not a linear, so it is
never adapted) and before `differentiate`.

Options: ctx.options["lora"], a LoraConfig; absent = the pass does nothing. It sets
ctx.options["trainable"] to the adapter tensors: only they train. Tensors already in ctx.weights
(a resumed run's adapter) are kept. Counts `adapted`. A target the model lacks, or dropout > 0
(not implemented: it needs a mask per adapted module per step), is a ReftError.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from ..errors import ReftError
from ..ir import Graph, Node, TensorType
from .context import PassContext
from .rewrite import make

SCALING = "lora.scaling"
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
        if self.dropout != 0.0:
            raise ReftError(f"--lora-dropout {self.dropout}: LoRA dropout is not implemented yet; use 0")
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
    cfg: LoraConfig | None = ctx.options.get("lora")
    if cfg is None:
        return graph
    cfg.check()
    chosen = adapted_modules(graph, cfg.targets)
    if SCALING not in ctx.weights:
        ctx.weights.define(SCALING, lambda: np.array(cfg.scale, np.float32))
    params: list[Node] = [Node("param", [], {"name": SCALING}, [TensorType((), "float32")])]
    s = params[0].out
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
        down = make("linear", [x, a.out])                      # (T, r)
        scaled = make("mul", [down.out, s])
        up = make("linear", [scaled.out, b.out])               # (T, out)
        total = make("add", [lin.out, up.out])
        graph.replace_uses(lin.out, total.out)                 # before `total` joins the graph
        at = graph.nodes.index(lin) + 1
        graph.nodes[at:at] = [down, scaled, up, total]
        ctx.count("adapted")
    first = next((i for i, n in enumerate(graph.nodes) if n.op not in ("input", "param")), len(graph.nodes))
    graph.nodes[first:first] = params
    ctx.options["trainable"] = trainable
    return graph
