"""GGUF files for tests, written by the `gguf` package (llama.cpp's own Python writer), so the
bytes reft reads come from an independent producer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize


def write_gguf(path: Path, arch: str, kv: dict, tensors: list) -> Path:
    """kv: key -> (value, GGUFValueType[, array element type]); tensors: (name, array, GGML type or
    None). An array of uint8 with a GGML type is taken as that type's raw blocks."""
    w = GGUFWriter(str(path), arch)
    for key, (value, vtype, *sub) in kv.items():
        w.add_key_value(key, value, vtype, sub_type=sub[0] if sub else None)
    for name, data, qtype in tensors:
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def copy_gguf(src: Path, dst: Path, *, arch: str | None = None, set_kv: dict | None = None, drop_kv=(),
              drop_tensors=(), retype: dict | None = None, add_tensors=()) -> Path:
    """A copy of `src` with metadata and tensors changed; `retype` maps tensor names to the GGML
    type to re-quantize them to (with gguf's quantizer)."""
    r = GGUFReader(str(src))
    kv = {}
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_kv:
            continue
        vtype = GGUFValueType(f.types[0])
        kv[key] = (f.contents(), vtype, GGUFValueType(f.types[-1])) if vtype == GGUFValueType.ARRAY else \
            (f.contents(), vtype)
    kv.update(set_kv or {})
    tensors = []
    for t in r.tensors:
        if t.name in drop_tensors:
            continue
        data = np.array(t.data)
        qtype = (retype or {}).get(t.name)
        if qtype is not None:
            tensors.append((t.name, quantize(data.astype(np.float32), qtype), qtype))
        else:
            tensors.append((t.name, data, None if t.tensor_type == GGMLQuantizationType.F32 else t.tensor_type))
    tensors += list(add_tensors)
    return write_gguf(dst, arch or r.fields["general.architecture"].contents(), kv, tensors)


def requantized(src: Path, dst: Path, qtype: str) -> Path:
    """A copy of the GGUF `src` with every matrix whose rows are whole 32-value blocks re-quantized
    to `qtype` (e.g. "Q4_1") by the gguf package."""
    names = {x.name for x in GGUFReader(str(src)).tensors if len(x.shape) == 2 and x.shape[0] % 32 == 0}
    return copy_gguf(src, dst, retype=dict.fromkeys(names, GGMLQuantizationType[qtype]))
