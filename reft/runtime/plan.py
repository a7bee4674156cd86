"""Loading a plan directory: manifest, final graphs, weights (memory-mapped), tokenizer."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

from ..errors import ModelError, PlanError
from ..ir import Graph, ParseError, parse_graph
from ..plan import read_manifest


def device_plan(path: str | Path, device: str | None) -> Path:
    """The plan directory that runs PLAN on `device` (a backend name: cpu, cuda, ...; None: the plan's
    own backend). A plan compiled with `reftc compile --backend A,B` holds B's plan in devices/B."""
    path = Path(path)
    m = read_manifest(path)
    own, more = m["backend"]["name"], m.get("devices") or {}
    if device is None or device == own:
        return path
    if device not in more:
        have = [own, *more]
        raise PlanError(f"{path} was compiled for {' and '.join(have)}, not {device}; compile it with"
                        f" `reftc compile MODEL -o {path} --backend {','.join([*have, device])}` to run it there")
    return path / more[device]


class Plan:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._graphs: dict[str, Graph] = {}

    def graph(self, entry: str = "forward") -> Graph:
        if entry not in self._graphs:
            spec = self.manifest["entry_points"].get(entry)
            if spec is None:
                raise PlanError(f"{self.path}: no entry point {entry!r}")
            f = self.path / spec["graph"]
            try:
                self._graphs[entry] = parse_graph(f.read_text())
            except (OSError, ParseError) as e:
                raise PlanError(f"{f}: cannot read graph ({e})") from None
        return self._graphs[entry]

    @property
    def entry_points(self) -> list[str]:
        return list(self.manifest["entry_points"])

    def writable_params(self, entry: str | None = None) -> set[str]:
        """Params an entry point (any, if None) updates in place; empty for inference plans."""
        eps = self.manifest["entry_points"]
        return {p for e, spec in eps.items() if entry in (None, e) for p in spec.get("writable", [])}

    @cached_property
    def weights(self):
        from ..frontends.safetensors import open_weights

        try:
            return open_weights(self.path / "weights")
        except ModelError as e:
            raise PlanError(f"plan weights: {e}") from None

    @cached_property
    def tokenizer(self):
        from ..frontends.tokenizer import Tokenizer

        try:
            return Tokenizer.from_dir(self.path / "tokenizer")
        except ModelError as e:
            raise PlanError(f"plan tokenizer: {e}") from None

    @property
    def task(self) -> str:
        """What the forward entry returns: "generate" (logits), "embed" (hidden states) or "train"."""
        return self.manifest.get("task") or "generate"

    @property
    def context_length(self) -> int:
        return int(self.manifest.get("context_length") or 2048)

    @property
    def kv(self) -> dict:
        return self.manifest["kv_cache"]
