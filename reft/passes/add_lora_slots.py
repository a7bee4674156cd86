"""LoRA adapter slots for serving (`reftc compile --max-loras N --max-lora-rank R`).

Every target projection `y = linear(x, W)` whose weight is `<module>.weight` gets

    y' = lora_add(y, x, lora.<module>.a, lora.<module>.b, lora_ids)

with two graph inputs per module, `lora.<module>.a` float32 [N, R, in] and `lora.<module>.b`
float32 [N, R, out] (N adapter slots, rank up to R), and one shared input `lora_ids` int32 [T]:
each token's adapter slot, -1 for the base model. The runtime owns those arrays as it owns the KV
pages (reft/runtime/lora.py loads PEFT adapters into slots), so one plan serves the base model and
up to N adapters in the same batch, and adapters load without recompiling.

Runs first in the pipeline, on the projections as the model wrote them (q_proj, k_proj, ...;
fuse_projections then still merges the base matmuls). The rope and GLU fusions do not match an
adapted projection, so a plan with slots runs those parts unfused.

Options: ctx.options["max_loras"] (0 or absent: the pass does nothing), "max_lora_rank" (16),
"lora_targets" (module names; None: every projection in DEFAULT_TARGETS the model has). A target
the model lacks is a ReftError. Counts `lora_modules`.
"""
from __future__ import annotations

from ..errors import ReftError
from ..ir import Graph, Node, TensorType
from .add_lora import linear_modules
from .context import PassContext
from .rewrite import make

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                   "gate_up_proj")
IDS = "lora_ids"


def add_lora_slots(graph: Graph, ctx: PassContext) -> Graph:
    slots = int(ctx.options.get("max_loras") or 0)
    if not slots:
        return graph
    rank = int(ctx.options.get("max_lora_rank") or 16)
    targets = ctx.options.get("lora_targets")
    found = linear_modules(graph)
    wanted = set(targets or DEFAULT_TARGETS)
    chosen = {m: n for m, n in found.items() if m.rsplit(".", 1)[-1] in wanted}
    lacking = sorted(t for t in (targets or ()) if not any(m.rsplit(".", 1)[-1] == t for m in found))
    if lacking:
        have = sorted({m.rsplit(".", 1)[-1] for m in found})
        raise ReftError(f"--lora-targets: the model has no {', '.join(lacking)} (its projections: {', '.join(have)})")
    if not chosen:
        raise ReftError("--max-loras: the model has none of the projections LoRA adapts"
                        f" ({', '.join(DEFAULT_TARGETS)})")
    T = graph.input("input_ids").out.shape[0]
    ids = Node("input", [], {"name": IDS}, [TensorType((T,), "int32")])
    new_inputs = [ids]
    for module, n in chosen.items():
        x, w = n.inputs[0], n.inputs[1]
        if len(x.shape) != 2:
            raise ReftError(f"--max-loras: {module} takes a rank-{len(x.shape)} input; LoRA slots need [tokens, in]")
        out_f, in_f = w.shape
        a = Node("input", [], {"name": f"lora.{module}.a"}, [TensorType((slots, rank, in_f), "float32")])
        b = Node("input", [], {"name": f"lora.{module}.b"}, [TensorType((slots, rank, out_f), "float32")])
        new_inputs += [a, b]
        add = make("lora_add", [n.out, x, a.out, b.out, ids.out])
        graph.replace_uses(n.out, add.out)
        add.inputs[0] = n.out
        graph.nodes.insert(graph.nodes.index(n) + 1, add)
        ctx.count("lora_modules")
    at = next((i for i, n in enumerate(graph.nodes) if n.op != "input"), len(graph.nodes))
    graph.nodes[at:at] = new_inputs
    return graph


def lora_layout(graph: Graph) -> dict | None:
    """The manifest's record of a graph's adapter slots (None without any): slots, rank, and each
    adapted module's [in, out]."""
    mods = {}
    for n in graph.inputs():
        if n.name.startswith("lora.") and n.name.endswith(".a"):
            slots, rank, in_f = n.out.shape
            out_f = graph.input(n.name[:-2] + ".b").out.shape[2]
            mods[n.name[len("lora."):-2]] = [in_f, out_f]
    if not mods:
        return None
    return {"max_loras": slots, "max_rank": rank, "modules": mods}
