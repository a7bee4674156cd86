"""A .gguf file (llama.cpp) as a model: HF-style config, weights by HF name, tokenizer.

`open_gguf(path)` returns a `GGUFModel` with the three things `reftc compile` needs from any
model source:
  hf_config   the normalised config.json dict reft's HF frontend produces (see config.py),
              from `{arch}.*` metadata; `architectures` is the family's HF name
  weights     a lazy Mapping (HF weight name -> float array) with `info(name)`, like the
              safetensors WeightSource
  tokenizer   from `tokenizer.ggml.*` (gguf_tokenizer.py), chat template included

Notable:
- Families opt in with three declarations beside their definition (models/llama.py):
  GGUF_ARCHITECTURES (general.architecture -> HF architecture), GGUF_TENSORS (GGUF name ->
  weight name, `{i}` = layer) and GGUF_ROPE_PERMUTED (weights whose q/k rows llama.cpp's
  converter interleaved for its rotary layout; undone here, per head); optionally a function
  `gguf_config(cfg) -> cfg` for what llama.cpp's loader assumes rather than reads from the file
  (models/gemma2.py: norms stored as 1 + w, the attention scale).
- Mixture-of-experts files hold each layer's experts as stacks (`ffn_gate_exps` [E, F, D], ...),
  which the families name as stacked weights (`...experts.*.w1.weight`); `{arch}.expert_count` also
  picks the family where one llama.cpp architecture covers several (`llama` with experts is
  Mixtral: families declare GGUF_EXPERTS = True to read those files).
- Phi-3's longrope arrives as tensors (rope_factors_long/short.weight) plus the original context
  and attention factor keys; it becomes the `longrope` rope_scaling of the config.
- Quantized tensors are dequantized to float32 when read (F32/F16/BF16 stay zero-copy views);
  `source_types` records what the file held. Blocks with a reft IR dtype (Q8_0 ... Q6_K) can stay
  quantized in the plan; MXFP4 (GPT-OSS's experts) is always dequantized to float32 at load. Rows are reordered on the raw bytes, so the same
  unpermute serves a plan that keeps blocks quantized.
- A file without output.weight ties the LM head to the token embedding, as llama.cpp does.
- A family may read metadata keys of its own (GGUF_HPARAMS: key -> config key, numbers and bools)
  and join tensors llama.cpp's converter split (GGUF_JOINED: GGUF name -> (its parts' GGUF names,
  join(*arrays)); used when the file has the parts instead of the whole: DeepSeek's attn_k_b /
  attn_v_b become kv_b_proj again). Joined tensors are float32.
"""
from __future__ import annotations

import math

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import ml_dtypes
import numpy as np

from ..errors import ModelError
from ..quant import dequantize, get_format
from .architectures import shipped_families
from .config import normalize_rope
from .gguf_file import GGUFFile
from .gguf_tokenizer import tokenizer_from_gguf
from .tokenizer import Tokenizer

# the GGML types read without conversion: type name -> (IR dtype, numpy dtype)
_PLAIN = {"F32": ("float32", np.dtype("<f4")), "F16": ("float16", np.dtype("<f2")),
          "BF16": ("bfloat16", np.dtype(ml_dtypes.bfloat16))}
# `{arch}.<key>` metadata -> config.json key
_HPARAMS = {"context_length": "max_position_embeddings", "embedding_length": "hidden_size",
            "feed_forward_length": "intermediate_size", "block_count": "num_hidden_layers",
            "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
            "attention.layer_norm_rms_epsilon": "rms_norm_eps", "attention.key_length": "head_dim",
            "rope.freq_base": "rope_theta", "attention.sliding_window": "sliding_window",
            "rope.freq_base_swa": "rope_local_base_freq", "attn_logit_softcapping": "attn_logit_softcapping",
            "final_logit_softcapping": "final_logit_softcapping",
            "rope.scaling.original_context_length": "original_max_position_embeddings",
            "expert_count": "num_local_experts", "expert_used_count": "num_experts_per_tok",
            "expert_feed_forward_length": "moe_intermediate_size",
            "rope.scaling.yarn_beta_fast": "yarn_beta_fast", "rope.scaling.yarn_beta_slow": "yarn_beta_slow"}
_FLOATS = ("attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.freq_base_swa", "attn_logit_softcapping",
           "final_logit_softcapping", "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow")
_REQUIRED = ("embedding_length", "feed_forward_length", "block_count", "attention.head_count")


@dataclass
class GGUFModel:
    path: Path
    family: ModuleType
    hf_config: dict
    weights: GGUFWeights
    tokenizer: Tokenizer

    @property
    def source_types(self) -> dict[str, int]:
        """GGML type name -> number of the model's tensors stored in it."""
        return self.weights.source_types()


def gguf_families(experts: bool = False) -> dict[str, ModuleType]:
    """general.architecture -> the shipped family module that reads its files without experts, or
    with them (`{arch}.expert_count` > 0: the families declaring GGUF_EXPERTS = True)."""
    out: dict[str, ModuleType] = {}
    for mod in shipped_families().values():
        if getattr(mod, "GGUF_EXPERTS", False) == experts:
            for arch in getattr(mod, "GGUF_ARCHITECTURES", {}):
                out.setdefault(arch, mod)
    return out


def unpermute_rope_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: within each head, rows (2j, 2j+1) go back to (j, j + D/2).
    `rows` is any array whose first axis holds n_heads * D rows (floats or raw block bytes)."""
    d = rows.shape[0] // n_heads
    if d * n_heads != rows.shape[0] or d % 2:
        raise ModelError(f"cannot undo the rotary row order: {rows.shape[0]} rows for {n_heads} heads")
    rest = rows.shape[1:]
    return np.ascontiguousarray(rows.reshape(n_heads, d // 2, 2, *rest).swapaxes(1, 2).reshape(rows.shape))


def hf_config_from_gguf(f: GGUFFile, arch: str, family: ModuleType) -> dict:
    meta = f.metadata
    missing = [f"{arch}.{k}" for k in _REQUIRED if f"{arch}.{k}" not in meta]
    if missing:
        raise ModelError(f"{f.path}: GGUF metadata lacks {', '.join(missing)}")
    cfg: dict = {"architectures": [family.GGUF_ARCHITECTURES[arch]], "model_type": arch}
    for key, hf_key in _HPARAMS.items():
        v = meta.get(f"{arch}.{key}")
        if v is None:
            continue
        if isinstance(v, (bool, str, list, np.ndarray)) or (key in _FLOATS) != isinstance(v, float):
            want = "a number" if key in _FLOATS else "an integer"
            raise ModelError(f"{f.path}: GGUF metadata {arch}.{key} must be {want}, got {v!r}")
        cfg[hf_key] = v
    for key, hf_key in getattr(family, "GGUF_HPARAMS", {}).items():   # keys only this family reads
        v = meta.get(f"{arch}.{key}")
        if v is not None and not isinstance(v, (bool, int, float)):
            raise ModelError(f"{f.path}: GGUF metadata {arch}.{key} must be a number, got {v!r}")
        if v is not None:
            cfg[hf_key] = v
    tokens = meta.get("tokenizer.ggml.tokens")
    embd = f.tensors.get("token_embd.weight")
    cfg["vocab_size"] = meta.get(f"{arch}.vocab_size") or (embd.shape[0] if embd else len(tokens or ()))
    cfg["tie_word_embeddings"] = "output.weight" not in f.tensors
    cfg["attention_bias"] = "blk.0.attn_q.bias" in f.tensors
    cfg["mlp_bias"] = "blk.0.ffn_up.bias" in f.tensors
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    cfg["head_dim"] = head_dim
    rot = meta.get(f"{arch}.rope.dimension_count")
    if rot and rot != head_dim:
        cfg["partial_rotary_factor"] = rot / head_dim
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, (list, np.ndarray)):        # per layer: whether it slides
        cfg["layer_types"] = ["sliding_attention" if on else "full_attention" for on in pattern]
    elif pattern is not None:
        cfg["sliding_window_pattern"] = int(pattern)
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind and kind != "none":
        cfg["rope_scaling"] = {"rope_type": kind, "factor": float(meta.get(f"{arch}.rope.scaling.factor", 1.0))}
    if "rope_factors_long.weight" in f.tensors:
        cfg["rope_scaling"] = _longrope(f, meta.get(f"{arch}.rope.scaling.attn_factor"))
    if "rope_freqs.weight" in f.tensors:
        if kind and kind != "none":
            raise ModelError(f"{f.path}: rope_freqs.weight together with rope scaling {kind!r} is not supported")
        rot = int(rot or head_dim)
        cfg["rope_scaling"] = llama3_scaling_from_factors(_rope_freqs(f), float(cfg.get("rope_theta", 10000.0)), rot,
                                                          f.path)
    hook = getattr(family, "gguf_config", None)
    try:
        cfg = hook(cfg) if hook else cfg
    except KeyError as e:
        raise ModelError(f"{f.path}: GGUF metadata lacks what {arch} needs: {e}") from None
    except ValueError as e:
        raise ModelError(f"{f.path}: {e}") from None
    return normalize_rope(cfg, f.path)


def _factors(f: GGUFFile, name: str) -> np.ndarray:
    r = f.tensors.get(name)
    if r is None or r.type_name not in _PLAIN:
        raise ModelError(f"{f.path}: {name} must be a float tensor, got {r.type_name if r else 'none'}")
    return f.raw(name).reshape(-1).view(_PLAIN[r.type_name][1]).astype(np.float64)


def _rope_freqs(f: GGUFFile) -> np.ndarray:
    return _factors(f, "rope_freqs.weight")


def _longrope(f: GGUFFile, attn_factor) -> dict:
    """Phi-3's longrope from convert_hf_to_gguf.py's rope_factors_long / _short tensors (the original
    context is the `rope.scaling.original_context_length` key, read with the hparams)."""
    out = {"rope_type": "longrope", "long_factor": _factors(f, "rope_factors_long.weight").tolist(),
           "short_factor": _factors(f, "rope_factors_short.weight").tolist()}
    if attn_factor is not None:
        out["attention_factor"] = float(attn_factor)
    return out


def llama3_scaling_from_factors(freqs: np.ndarray, theta: float, rot: int, where) -> dict:
    """Llama 3 rope scaling recovered from a GGUF's per-frequency factors (rope_freqs.weight):
    llama.cpp divides frequency i by factor f_i, which convert_hf_to_gguf.py computed from
    (factor, low_freq_factor, high_freq_factor, original_max_position). f_i is 1 at short
    wavelengths, `factor` at long ones, and 1 / ((1 - s) / factor + s) between, with s linear in
    1 / wavelength: two numbers fix that line, and (orig, low, high) scaled together give the same
    factors, so low = 1 is taken. Factors that no such curve reproduces are an error."""
    if freqs.shape != (rot // 2,) or not np.all(np.isfinite(freqs)) or freqs.min() <= 0:
        raise ModelError(f"{where}: rope_freqs.weight must hold {rot // 2} positive factors, got shape {freqs.shape}")
    inv = 1.0 / theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot)
    factor = float(freqs.max())
    if factor <= 1.0 + 1e-6:
        return {"rope_type": "default"}
    mid = (freqs > 1 + 1e-4) & (freqs < factor * (1 - 1e-4))
    fitted = None
    if mid.sum() >= 2:
        s = (1 / freqs[mid] - 1 / factor) / (1 - 1 / factor)       # smooth, linear in 1 / wavelength
        a, b = np.polyfit(inv[mid] / (2 * math.pi), s, 1)
        if a > 0 and b < 0:
            lo, hi = 1.0, 1.0 - 1.0 / b
            fitted = {"rope_type": "llama3", "factor": factor, "low_freq_factor": lo, "high_freq_factor": hi,
                      "original_max_position_embeddings": int(round(a * (hi - lo)))}
            # the file's float32 factors: keep the round numbers they came from where those fit as well
            rounded = {k: float(round(v, 3)) if isinstance(v, float) else v for k, v in fitted.items()}
            if np.allclose(_llama3_factors(inv, rounded), freqs, rtol=1e-5, atol=0):
                fitted = rounded
    if fitted is None or not np.allclose(_llama3_factors(inv, fitted), freqs, rtol=1e-4, atol=0):
        raise ModelError(f"{where}: rope_freqs.weight does not follow Llama 3 rope scaling; other per-frequency"
                         " factors are not supported yet")
    return fitted


def _llama3_factors(inv: np.ndarray, s: dict) -> np.ndarray:
    factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - lo) / (hi - lo)
    scaled = np.where(wavelen > old / lo, inv / factor, np.where(wavelen < old / hi, inv,
                                                                  (1 - smooth) * inv / factor + smooth * inv))
    return inv / scaled


class GGUFWeights(Mapping):
    """HF weight name -> float array, read from the file on access."""

    def __init__(self, f: GGUFFile, family: ModuleType, hf: dict):
        self.file = f
        n = hf["num_hidden_layers"]
        self._names: dict[str, str] = {}  # HF name -> GGUF name
        for gname, hname in family.GGUF_TENSORS.items():
            for i in range(n) if "{i}" in gname else [None]:
                g = gname.format(i=i)
                if g in f.tensors:
                    self._names[hname.format(i=i)] = g
        self._heads: dict[str, int] = {}
        for hname in self._names:
            for proj in family.GGUF_ROPE_PERMUTED:
                if f".{proj}." in f".{hname}":
                    is_k = proj.endswith("k_proj")
                    self._heads[hname] = hf["num_key_value_heads" if is_k else "num_attention_heads"]
        self._joined: dict[str, tuple[list[str], object]] = {}   # HF name -> (GGUF names of its parts, join)
        for gname, (parts, join) in getattr(family, "GGUF_JOINED", {}).items():
            for i in range(n) if "{i}" in gname else [None]:
                names = [q.format(i=i) for q in parts]
                if gname.format(i=i) not in f.tensors and all(q in f.tensors for q in names):
                    self._joined[family.GGUF_TENSORS[gname].format(i=i)] = (names, join)

    def _part(self, gname: str) -> np.ndarray:
        """A tensor by its GGUF name, as floats (a part of a joined tensor)."""
        r = self.file.tensors[gname]
        raw = self.file.raw(gname)
        if r.type_name in _PLAIN:
            return raw.reshape(-1).view(_PLAIN[r.type_name][1]).reshape(r.shape)
        return dequantize(raw, r.ggml_type, r.shape)

    def _record(self, name: str):
        return self.file.tensors[self._names[name]]

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        if name in self._joined:   # the shape of the join of zero-stride stand-ins (nothing read)
            names, join = self._joined[name]
            stand_ins = [np.broadcast_to(np.float32(0), self.file.tensors[q].shape) for q in names]
            return "float32", tuple(join(*stand_ins).shape)
        r = self._record(name)
        return _PLAIN.get(r.type_name, ("float32",))[0], r.shape

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as rows, uint8[rows, row_bytes] (a stack [E, rows, row_bytes]), q/k rows
        back in HF order."""
        r = self._record(name)
        data = self.file.raw(self._names[name])
        if len(r.shape) == 3:
            return data.reshape(r.shape[0], r.shape[1], -1)
        one_per_row = len(r.shape) > 1 or get_format(r.ggml_type).block_values == 1
        rows = data.reshape(r.shape[0] if one_per_row and r.shape else 1, -1)
        return unpermute_rope_rows(rows, self._heads[name]) if name in self._heads else rows

    def quantized_dtype(self, name: str) -> str | None:
        """The IR dtype that keeps this tensor's blocks as they are (None for F32/F16/BF16); the
        compiler then binds it to `raw(name)` instead of the dequantized floats."""
        from ..ir.quantized import ir_dtype_of_ggml

        if name in self._joined:
            return None
        r = self._record(name)
        return ir_dtype_of_ggml(r.type_name) if len(r.shape) in (2, 3) else None

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._joined:
            names, join = self._joined[name]
            return np.ascontiguousarray(join(*(self._part(q) for q in names)), np.float32)
        r = self._record(name)
        raw = self.raw(name)
        if r.type_name in _PLAIN:
            return raw.reshape(-1).view(_PLAIN[r.type_name][1]).reshape(r.shape)
        return dequantize(raw, r.ggml_type, r.shape)

    def check_types(self) -> None:
        """Fail now, naming the tensor, if the model uses a type reft cannot read (not mid-write)."""
        for g in [*self._names.values(), *(q for names, _ in self._joined.values() for q in names)]:
            self.file.raw(g)

    def source_types(self) -> dict[str, int]:
        parts = [self.file.tensors[q] for names, _ in self._joined.values() for q in names]
        return dict(Counter([self._record(n).type_name for n in self._names] + [r.type_name for r in parts]))

    def __contains__(self, name) -> bool:
        return name in self._names or name in self._joined

    def __iter__(self) -> Iterator[str]:
        return iter([*self._names, *self._joined])

    def __len__(self) -> int:
        return len(self._names) + len(self._joined)


def open_gguf(path: str | Path, family: ModuleType | None = None) -> GGUFModel:
    """Read a .gguf file's config, weight map and tokenizer (weights stay on disk until read).
    `family` overrides the shipped families (a --model-def module with GGUF declarations)."""
    f = GGUFFile(path)
    arch = f.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelError(f"{f.path}: GGUF metadata has no general.architecture")
    experts = bool(f.metadata.get(f"{arch}.expert_count"))
    families = gguf_families(experts)
    if family is not None:
        if arch not in getattr(family, "GGUF_ARCHITECTURES", {}):
            raise ModelError(f"{f.path}: the model definition does not declare GGUF_ARCHITECTURES for {arch!r}")
    elif arch in families:
        family = families[arch]
    else:
        supported = sorted(gguf_families()) + [f"{a} with experts" for a in sorted(gguf_families(True))]
        raise ModelError(f"{f.path}: GGUF architecture {arch!r}{' with experts' if experts else ''} is not"
                         f" supported (supported: {', '.join(supported)})")
    hf = hf_config_from_gguf(f, arch, family)
    weights = GGUFWeights(f, family, hf)
    weights.check_types()
    return GGUFModel(f.path, family, hf, weights, tokenizer_from_gguf(f.metadata, f.path))
