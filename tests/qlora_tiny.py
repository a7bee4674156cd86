"""A tiny Llama as a GGUF file with block-quantized weights, for QLoRA tests: every projection in one
of llama.cpp's eight block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 quantized by the `gguf` package's
quantizer; Q4_K, Q5_K, Q6_K as random blocks with moderate scales, since the package only
dequantizes those), a Q8_0 token embedding, a Q6_K LM head and float32 norms, written by the `gguf`
package with q/k rows permuted as llama.cpp's converter stores them; plus the transformers model
with the same weights dequantized by the `gguf` package's own dequantizer (the reference: reft's
dequantizer is not used).

hidden 256 (a K-quant super-block), FFN 512, 4 heads / 2 KV heads, 2 layers, the stories260K
tokenizer (vocab 512)."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize, quantize
from gguf_util import copy_gguf
from paths import SHARED_MODELS

STORIES_GGUF = SHARED_MODELS / "stories260K" / "stories260K.gguf"   # tokenizer metadata
U32, F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
HIDDEN, FFN, HEADS, KV_HEADS, LAYERS, VOCAB = 256, 512, 4, 2, 2, 512
# llama.cpp name (per layer) -> block type of layer 0 / layer 1: all eight types, each K-quant twice
TYPES = {"attn_q": (Q.Q4_K, Q.Q5_0), "attn_k": (Q.Q6_K, Q.Q5_1), "attn_v": (Q.Q8_0, Q.Q5_K),
         "attn_output": (Q.Q4_0, Q.Q4_K), "ffn_gate": (Q.Q4_1, Q.Q6_K), "ffn_up": (Q.Q5_K, Q.Q8_0),
         "ffn_down": (Q.Q4_K, Q.Q4_1)}
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}
# K-quant super-blocks: (bytes, byte offset and value of each float16 scale): values up to ~0.1
KQUANT = {Q.Q4_K: (144, {0: 1.2e-4, 2: 8e-4}), Q.Q5_K: (176, {0: 6e-5, 2: 8e-4}), Q.Q6_K: (210, {208: 2.5e-5})}


def permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order (rows of floats or of raw blocks alike)."""
    n = rows.shape[0]
    return rows.reshape(heads, 2, n // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    n = rows.shape[0]
    return rows.reshape(heads, n // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def kquant_rows(qtype, n: int, k: int, rng) -> np.ndarray:
    """uint8[n, row bytes]: random codes and sub-block scales, float16 super-block scales near KQUANT's."""
    size, scales = KQUANT[qtype]
    raw = rng.integers(0, 256, (n * k // 256, size), dtype=np.uint8)
    for off, value in scales.items():
        d = (value * rng.uniform(0.5, 1.0, raw.shape[0])).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(n, k // 256 * size)


def block_rows(w: np.ndarray, qtype, rng) -> np.ndarray:
    """w [n, k] in `qtype`'s raw blocks (K-quants: random blocks instead of w)."""
    if qtype in KQUANT:
        return kquant_rows(qtype, w.shape[0], w.shape[1], rng)
    return quantize(w, qtype)


def write_tiny_gguf(path, seed: int = 0):
    """Write the GGUF; returns its path."""
    rng = np.random.default_rng(seed)
    heads = {"attn_q": HEADS, "attn_k": KV_HEADS}
    kv_dim = HIDDEN // HEADS * KV_HEADS
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (kv_dim, HIDDEN), "attn_v": (kv_dim, HIDDEN),
              "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN),
              "ffn_down": (HIDDEN, FFN)}
    tensors = [("token_embd.weight", quantize(rng.normal(0, 0.5, (VOCAB, HIDDEN)).astype(np.float32), Q.Q8_0),
                Q.Q8_0),
               ("output_norm.weight", rng.uniform(0.8, 1.2, HIDDEN).astype(np.float32), None),
               ("output.weight", kquant_rows(Q.Q6_K, VOCAB, HIDDEN, rng), Q.Q6_K)]
    for i in range(LAYERS):
        for norm in ("attn_norm", "ffn_norm"):
            tensors.append((f"blk.{i}.{norm}.weight", rng.uniform(0.8, 1.2, HIDDEN).astype(np.float32), None))
        for name, types in TYPES.items():
            n, k = shapes[name]
            raw = block_rows(rng.uniform(-0.1, 0.1, (n, k)).astype(np.float32), types[i], rng)
            if name in heads:
                raw = permute(raw, heads[name])
            tensors.append((f"blk.{i}.{name}.weight", raw, types[i]))
    kv = {"llama.context_length": (128, U32), "llama.embedding_length": (HIDDEN, U32),
          "llama.block_count": (LAYERS, U32), "llama.feed_forward_length": (FFN, U32),
          "llama.attention.head_count": (HEADS, U32), "llama.attention.head_count_kv": (KV_HEADS, U32),
          "llama.rope.dimension_count": (HIDDEN // HEADS, U32), "llama.rope.freq_base": (10000.0, F32),
          "llama.attention.layer_norm_rms_epsilon": (1e-5, F32)}
    src = GGUFReader(str(STORIES_GGUF))
    return copy_gguf(STORIES_GGUF, path, set_kv=kv, drop_tensors={t.name for t in src.tensors}, add_tensors=tensors)


def dequantized_state(path) -> dict[str, np.ndarray]:
    """The file's weights by Hugging Face name, dequantized by the `gguf` package, q/k rows back in
    Hugging Face order."""
    out = {}
    for t in GGUFReader(str(path)).tensors:
        w = np.asarray(dequantize(np.asarray(t.data), t.tensor_type), np.float32)    # [rows, cols]
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            out["model.embed_tokens.weight"] = w
        elif t.name == "output.weight":
            out["lm_head.weight"] = w
        elif t.name == "output_norm.weight":
            out["model.norm.weight"] = w
        elif parts[2] in ("attn_norm", "ffn_norm"):
            norm = "input_layernorm" if parts[2] == "attn_norm" else "post_attention_layernorm"
            out[f"model.layers.{parts[1]}.{norm}.weight"] = w
        else:
            if parts[2] in ("attn_q", "attn_k"):
                w = unpermute(w, HEADS if parts[2] == "attn_q" else KV_HEADS)
            out[f"model.layers.{parts[1]}.{HF_NAMES[parts[2]]}.weight"] = w
    return out


def hf_model(path):
    """The transformers LlamaForCausalLM holding the GGUF's dequantized weights (float32)."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                   num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                   max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    state = {k: torch.from_numpy(np.array(v)) for k, v in dequantized_state(path).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model
