"""Read a HF model folder's config.json and generation_config.json into plain dicts.

Notable: rope settings come in two layouts and we hand models exactly one.
  transformers >= 5:  "rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0, ...}
                      (or, for models with several layer types, {"full_attention": {...}, ...})
  most Hub files:     "rope_theta": 5e5, "rope_scaling": {"type"|"rope_type": "llama3", ...} or null
Normalised output:    "rope_theta": float (default 10000.0),
                      "rope_scaling": {"rope_type": "default"|"linear"|"llama3"|..., <its parameters>}
and, for per-layer-type parameters, "rope_scaling_by_layer_type": {layer_type: {"rope_theta", "rope_type",
...}}. `rope_parameters` itself is dropped; which rope types are supported is the model's call.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelError

DEFAULT_ROPE_THETA = 10000.0


def read_json(path: Path) -> dict:
    """A JSON object from a file, or a one-line ModelError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: cannot read: {e}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _model_dir(model_dir) -> Path:
    p = Path(model_dir)
    if not p.is_dir():
        raise ModelError(f"{p}: no such model directory")
    return p


def _theta(value, where: Path) -> float:
    if value is None:
        return DEFAULT_ROPE_THETA
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ModelError(f"{where}: rope_theta must be a positive number, got {value!r}")
    return float(value)


def _scaling(params: dict | None, where: Path) -> dict:
    """{"rope_type": ..., params...} from a rope_scaling / rope_parameters dict (theta removed)."""
    if params is None:
        return {"rope_type": "default"}
    if not isinstance(params, dict):
        raise ModelError(f"{where}: rope_scaling must be an object or null, got {params!r}")
    out = {k: v for k, v in params.items() if k not in ("type", "rope_type", "rope_theta")}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if not isinstance(rope_type, str):
        raise ModelError(f"{where}: rope_type must be a string, got {rope_type!r}")
    return {"rope_type": rope_type, **out}


def normalize_rope(cfg: dict, where: Path) -> dict:
    """A copy of `cfg` with rope settings in the one layout described in the module docstring."""
    cfg = dict(cfg)
    params = cfg.pop("rope_parameters", None)
    if params is None:
        cfg["rope_theta"] = _theta(cfg.get("rope_theta"), where)
        cfg["rope_scaling"] = _scaling(cfg.get("rope_scaling"), where)
        return cfg
    if not isinstance(params, dict):
        raise ModelError(f"{where}: rope_parameters must be an object, got {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):  # per layer type
        by_type = {t: {"rope_theta": _theta(p.get("rope_theta", cfg.get("rope_theta")), where), **_scaling(p, where)}
                   for t, p in params.items()}
        cfg["rope_scaling_by_layer_type"] = by_type
        params = params.get("full_attention") or next(iter(params.values()))
    if "partial_rotary_factor" in params and cfg.get("partial_rotary_factor") is None:   # transformers 5 writes null
        cfg["partial_rotary_factor"] = params["partial_rotary_factor"]
    cfg["rope_theta"] = _theta(params.get("rope_theta", cfg.get("rope_theta")), where)
    cfg["rope_scaling"] = _scaling(params, where)
    return cfg


def load_hf_config(model_dir) -> dict:
    """config.json of a model folder, rope settings normalised."""
    path = _model_dir(model_dir) / "config.json"
    return normalize_rope(read_json(path), path)


def load_generation_config(model_dir) -> dict:
    """generation_config.json if present (else {}), plus `eos_token_ids`: always a list of ints."""
    path = _model_dir(model_dir) / "generation_config.json"
    cfg = read_json(path) if path.is_file() else {}
    eos = cfg.get("eos_token_id")
    eos = [] if eos is None else [eos] if type(eos) is int else eos
    if not (isinstance(eos, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in eos)):
        raise ModelError(f"{path}: eos_token_id must be an int or a list of ints, got {cfg.get('eos_token_id')!r}")
    cfg["eos_token_ids"] = list(eos)
    return cfg
