"""Checkpoints: full models in the Hugging Face layout, trainer state beside them, atomic saves.

  CHECKPOINT_DIR/checkpoint-<step>/
    config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json
                              (full / freeze fine-tuning: `reftc compile` and transformers load it)
    adapter_config.json, adapter_model.safetensors       (LoRA instead: lora_adapter.py)
    trainer_state.json        step, identity, scheduler, data order, RNG, metrics
    optimizer.safetensors     AdamW state (optim.m.<param>, optim.v.<param>), float32

Notable:
- Every save is written into a temporary directory beside its destination and renamed into
  place; an interrupted save leaves the previous checkpoints as they were (stale temporary
  directories are removed by the next save). `save_total_limit` keeps the newest N.
- A checkpoint is complete when it holds trainer_state.json (written last); `latest()` only
  returns complete ones.
- `identity` is a dict of fingerprints (`fingerprint(obj)`: model config + parameter shapes,
  run configuration, ...). Resuming compares it key by key and names the first difference.
- Weights are written as given (float32 master weights); `dtype` casts a final export.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ...errors import ReftError
from ...frontends.safetensors import SafetensorsFile, write_safetensors
from ...ir.types import np_dtype

STATE_FILE, OPTIMIZER_FILE = "trainer_state.json", "optimizer.safetensors"
STATE_VERSION = 1
# reft's own keys in a normalised config, and facts about the source file that a float checkpoint drops
DROP_CONFIG_KEYS = ("quantization_config", "_model_name_or_path", "rope_scaling_by_layer_type", "_name_or_path")


class CheckpointError(ReftError):
    """A checkpoint that cannot be written, read or resumed from."""


def fingerprint(obj) -> str:
    """A short stable hash of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(config: dict, param_shapes: Mapping[str, tuple]) -> str:
    """Fingerprint of a model: its config (less source-file facts) and every parameter's name and shape."""
    cfg = {k: v for k, v in config.items() if k not in DROP_CONFIG_KEYS + ("dtype", "torch_dtype")}
    return fingerprint({"config": cfg, "params": sorted((n, list(s)) for n, s in param_shapes.items())})


def _json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# -- the Hugging Face model layout ----------------------------------------------------------------

def hf_config(config: dict, dtype: str = "float32") -> dict:
    """config.json of a float checkpoint from the model's (normalised) config dict."""
    if not config.get("model_type") or not config.get("architectures"):
        raise CheckpointError("the model config has no model_type / architectures; cannot write config.json")
    out = {k: v for k, v in config.items() if k not in DROP_CONFIG_KEYS}
    out["dtype"] = out["torch_dtype"] = dtype
    return out


def write_hf_model(out: Path, config: dict, weights: Mapping[str, np.ndarray], tokenizer=None,
                   generation_config: dict | None = None, dtype: str = "float32") -> None:
    """Write config.json, model.safetensors (HF parameter names) and the tokenizer files into `out`.
    A tied LM head is not written (transformers ties it to the embedding again)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(config, dtype)
    names = [n for n in weights if not (cfg.get("tie_word_embeddings") and n == "lm_head.weight")]
    target = np_dtype(dtype)
    items = [(n, dtype, tuple(weights[n].shape), lambda n=n: np.asarray(weights[n]).astype(target, copy=False))
             for n in names]
    write_safetensors(out / "model.safetensors", items, metadata={"format": "pt"})
    _json(out / "config.json", cfg)
    if tokenizer is not None:
        tokenizer.save_to(out)
    if generation_config:
        path = out / "generation_config.json"
        gen = json.loads(path.read_text()) if path.is_file() else {}
        _json(path, {**gen, **generation_config})


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, as arrays in memory."""
    with SafetensorsFile(path) as f:
        return {n: np.array(f.get(n)) for n in f.names()}


# -- trainer state ----------------------------------------------------------------------------------

@dataclass
class TrainerState:
    step: int
    identity: dict                                   # name -> fingerprint; must match to resume
    scheduler: dict = field(default_factory=dict)    # LRSchedule.state_dict()
    data: dict = field(default_factory=dict)         # Loader.state_dict()
    rng: dict = field(default_factory=dict)          # numpy bit generator state(s)
    metrics: dict = field(default_factory=dict)
    optimizer: Mapping[str, np.ndarray] = field(default_factory=dict)   # optim.m.* / optim.v.*

    def check_identity(self, expect: dict, where: Path) -> None:
        for k, want in expect.items():
            got = self.identity.get(k)
            if got != want:
                raise CheckpointError(f"--resume {where}: the checkpoint was made for another {k}"
                                      f" ({got} there, {want} here); resume with the same model and run options")


def write_trainer_state(out: Path, state: TrainerState) -> None:
    items = [(n, "float32", tuple(a.shape), lambda a=a: np.asarray(a, np.float32))
             for n, a in sorted(state.optimizer.items())]
    write_safetensors(out / OPTIMIZER_FILE, items)
    rec = {"version": STATE_VERSION, "step": state.step, "identity": state.identity, "scheduler": state.scheduler,
           "data": state.data, "rng": state.rng, "metrics": state.metrics}
    _json(out / STATE_FILE, rec)      # last: its presence marks the checkpoint complete


def read_trainer_state(ckpt: str | Path, expect: dict | None = None) -> TrainerState:
    """The trainer state of a checkpoint; with `expect`, it must carry the same identity."""
    ckpt = Path(ckpt)
    path = ckpt / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"--resume {ckpt}: not a complete reft checkpoint (no {STATE_FILE})")
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    if rec.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: trainer state version {rec.get('version')} (this reft reads {STATE_VERSION})")
    state = TrainerState(int(rec["step"]), rec["identity"], rec["scheduler"], rec["data"], rec["rng"],
                         rec.get("metrics", {}), read_weights(ckpt / OPTIMIZER_FILE))
    if expect is not None:
        state.check_identity(expect, ckpt)
    return state


def rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def restore_rng(state: dict) -> np.random.Generator:
    bg = getattr(np.random, state["bit_generator"])()
    bg.state = state
    return np.random.Generator(bg)


# -- atomic directories and the checkpoint folder -----------------------------------------------------

def write_dir_atomic(out: str | Path, write: Callable[[Path], None]) -> Path:
    """write(tmp) into a temporary sibling of `out`, then rename it to `out` (replacing it)."""
    out = Path(out).resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise CheckpointError(f"{out.parent}: cannot write there ({e.strerror or e})") from None
    try:
        write(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def save_model(out: str | Path, config: dict, weights: Mapping[str, np.ndarray], tokenizer=None,
               generation_config: dict | None = None, dtype: str = "float32") -> Path:
    """A standalone Hugging Face model folder, written atomically (`reft export`)."""
    return write_dir_atomic(out, lambda tmp: write_hf_model(tmp, config, weights, tokenizer, generation_config, dtype))


class CheckpointDir:
    """CHECKPOINT_DIR: numbered checkpoints, saved atomically, the newest `save_total_limit` kept."""

    PREFIX = "checkpoint-"

    def __init__(self, root: str | Path, save_total_limit: int | None = None):
        self.root = Path(root)
        self.limit = save_total_limit
        if save_total_limit is not None and save_total_limit < 1:
            raise CheckpointError(f"--save-total-limit must be at least 1, got {save_total_limit}")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.root).close()
        except OSError as e:
            raise CheckpointError(f"checkpoint dir {self.root}: not writable ({e.strerror or e})") from None

    def path(self, step: int) -> Path:
        return self.root / f"{self.PREFIX}{step}"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        found = [(int(p.name[len(self.PREFIX):]), p) for p in self.root.glob(self.PREFIX + "*")
                 if p.name[len(self.PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        c = self.checkpoints()
        return c[-1] if c else None

    def save(self, state: TrainerState, write_model: Callable[[Path], None]) -> Path:
        """write_model(dir) writes the model or adapter files; the trainer state follows."""
        def write(tmp: Path):
            write_model(tmp)
            write_trainer_state(tmp, state)
        out = write_dir_atomic(self.path(state.step), write)
        self._prune(keep=out)
        return out

    def _prune(self, keep: Path) -> None:
        for p in self.root.glob(f".{self.PREFIX}*.tmp-*"):   # interrupted earlier saves
            shutil.rmtree(p, ignore_errors=True)
        if self.limit is None:
            return
        done = [p for p in self.checkpoints() if p.resolve() != keep.resolve()]
        for p in done[:max(0, len(done) - (self.limit - 1))]:
            shutil.rmtree(p, ignore_errors=True)
