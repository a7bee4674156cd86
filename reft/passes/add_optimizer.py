"""Append the optimizer update to a training graph: global-norm clipping and AdamW.

Input: a graph whose outputs include `grad.<name>` (float32, the shape of param <name>) for each
trainable parameter (what the autodiff pass emits). The pass adds
  inputs   optim.lr   float32[]   learning rate of this step (the runtime's schedule)
           optim.step int32[]     1-based step count (bias correction)
  params   optim.m.<name>, optim.v.<name>   fp32 AdamW state, zeros in ctx.weights unless present
  nodes    grad_norm_sq(all grads) -> output `optim.grad_norm_sq` (its sqrt is the logged norm),
           then one adamw_update per parameter, reading that sum when clipping is on
and drops the `grad.*` outputs (the updates consume them; DCE keeps the side-effecting updates).

Notable:
- No weight decay on 1-D parameters (RMSNorm weights, biases) unless `decay_1d`.
- Updated parameters and their state are written in place: `written_params(graph)` lists them,
  and the pass records them as `ctx.artifacts["writable"][graph.name]` for the plan's manifest
  (`entry_points.<entry>.writable`).
- Options come as `ctx.options["optimizer"]`, an AdamW record (defaults: torch's betas/eps, no
  weight decay, max_grad_norm 1.0; 0 turns clipping off).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ReftError
from ..ir import Graph, Node, Value, ops
from ..ir.types import TensorType
from .context import PassContext

GRAD = "grad."
LR, STEP, NORM = "optim.lr", "optim.step", "optim.grad_norm_sq"


@dataclass(frozen=True)
class AdamW:
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0      # 0 = no clipping
    decay_1d: bool = False          # weight decay on norms and biases too


def state_names(param: str) -> tuple[str, str]:
    """Names of the AdamW moments of `param` in the plan's weights."""
    return f"optim.m.{param}", f"optim.v.{param}"


def add_optimizer(graph: Graph, ctx: PassContext) -> Graph:
    cfg: AdamW = ctx.options.get("optimizer") or AdamW()
    params = {n.name: n.out for n in graph.params()}
    grads: dict[str, Value] = {}
    for out, v in graph.outputs.items():
        if not out.startswith(GRAD):
            continue
        name = out[len(GRAD):]
        p = params.get(name)
        if p is None:
            raise ReftError(f"add_optimizer: output {out} names no parameter of graph {graph.name}")
        if p.type.dtype != "float32" or v.type != p.type:
            raise ReftError(f"add_optimizer: parameter {name} is {p.type} with gradient {v.type};"
                            " training keeps float32 master weights and gradients")
        grads[name] = v
    if not grads:
        raise ReftError(f"add_optimizer: graph {graph.name} has no grad.<param> outputs (no trainable parameters)")

    sources: list[Node] = []

    def source(op: str, name: str, t: TensorType) -> Value:
        n = Node(op, [], {"name": name}, [t])
        sources.append(n)
        return n.out

    lr = source("input", LR, TensorType((), "float32"))
    step = source("input", STEP, TensorType((), "int32"))
    state = {}
    for name, p in params.items():
        if name not in grads:
            continue
        for sname in state_names(name):
            if sname not in ctx.weights:
                ctx.weights.define(sname, lambda shape=p.type.shape: np.zeros(shape, np.float32))
        state[name] = tuple(source("param", s, p.type) for s in state_names(name))
    tail: list[Node] = []

    def emit(op: str, inputs: list[Value], **attrs) -> Node:
        n = Node(op, inputs, attrs, ops.infer_types(op, [v.type for v in inputs], attrs))
        tail.append(n)
        return n

    order = [name for name in params if name in grads]
    sumsq = emit("grad_norm_sq", [grads[name] for name in order]).out
    clip = cfg.max_grad_norm > 0
    no_decay = 0
    for name in order:
        p, (m, v) = params[name], state[name]
        wd = cfg.weight_decay if (p.type.rank > 1 or cfg.decay_1d) else 0.0
        no_decay += wd == 0.0 and cfg.weight_decay > 0
        emit("adamw_update", [p, grads[name], m, v, lr, step] + ([sumsq] if clip else []), beta1=cfg.beta1,
             beta2=cfg.beta2, eps=cfg.eps, weight_decay=wd, max_norm=cfg.max_grad_norm if clip else 0.0)

    first = next((i for i, n in enumerate(graph.nodes) if n.op not in ("input", "param")), len(graph.nodes))
    graph.nodes[first:first] = sources
    graph.nodes.extend(tail)
    graph.outputs = {k: v for k, v in graph.outputs.items() if not k.startswith(GRAD)}
    graph.outputs[NORM] = sumsq
    ctx.artifacts.setdefault("writable", {})[graph.name] = written_params(graph)
    ctx.count("adamw_update", len(order))
    ctx.count("no_weight_decay", no_decay)
    ctx.count("clipped", int(clip))
    return graph


def written_params(graph: Graph) -> list[str]:
    """Parameters a side-effecting node writes in place (through its aliased inputs, views followed)."""
    effects = ops.ops_with(ops.SIDE_EFFECT)
    out = []
    for n in graph.nodes:
        if n.op not in effects:
            continue
        for i in ops.get(n.op).aliases.values():
            v = n.inputs[i]
            while v.node.op != "param" and 0 in ops.get(v.node.op).aliases and ops.VIEW in ops.get(v.node.op).traits:
                v = v.node.inputs[ops.get(v.node.op).aliases[0]]
            if v.node.op == "param" and v.node.name not in out:
                out.append(v.node.name)
    return sorted(out)
