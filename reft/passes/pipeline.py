"""The compile pipeline, in one place, in phases. `reftc compile --dump DIR` writes the IR
after each of these as NNN_<name>.ir."""
from __future__ import annotations

from .absorb_latent_attention import absorb_latent_attention
from .add_lora import add_lora, add_lora_eval
from .add_lora_slots import add_lora_slots
from .add_optimizer import add_optimizer
from .attach_loss import attach_loss
from .cast_weights import cast_weights
from .differentiate import differentiate
from .eliminate_common_subexpressions import eliminate_common_subexpressions
from .eliminate_dead_code import eliminate_dead_code
from .extract_hidden_states import extract_hidden_states
from .fold_weight_views import fold_weight_views
from .fuse_add_rms_norm import fuse_add_rms_norm
from .fuse_glu import fuse_glu
from .fuse_projections import fuse_projections
from .fuse_qkv_rope import fuse_qkv_rope
from .lower_paged_attention import lower_paged_attention
from .manager import PassFn
from .plan_memory import plan_memory_pass
from .quantize_weights import quantize_weights
from .scale_activations import scale_activations

# -- tasks (`reftc compile --task`): what the forward entry returns. Run on the traced graph before its
#    weights are bound, so weights a task drops (an LM head) need not be in the checkpoint
TASKS: dict[str, list[tuple[str, PassFn]]] = {
    "generate": [],                                  # logits at logit_rows
    "embed": [
        ("extract_hidden_states", extract_hidden_states),   # the final norm's output at logit_rows
        ("eliminate_dead_code", eliminate_dead_code),       # drops the LM head
    ],
}

PIPELINE: list[tuple[str, PassFn]] = [
    # -- clean-up of the traced model
    ("eliminate_dead_code", eliminate_dead_code),
    ("eliminate_common_subexpressions", eliminate_common_subexpressions),
    ("add_lora_slots", add_lora_slots),              # --max-loras: per-row LoRA updates from runtime adapter slots
    # -- compile-time weight transforms
    ("fold_weight_views", fold_weight_views),        # reshape / transpose of a weight -> a reordered weight
    ("fuse_projections", fuse_projections),
    ("absorb_latent_attention", absorb_latent_attention),   # MLA: queries into the latent, no expanded K/V
    ("eliminate_dead_code", eliminate_dead_code),   # drops the weights the fusion replaced
    ("scale_activations", scale_activations),        # --calibrate: AWQ-style scales folded into RMSNorm weights
    ("quantize_weights", quantize_weights),          # --quant: projection matmuls to int8 / int4
    ("cast_weights", cast_weights),                  # float weights to --dtype (quantized ones stay)
    # -- KV cache: attention reads and writes pages owned by the runtime
    ("lower_paged_attention", lower_paged_attention),
]

# -- kernel fusion and memory planning: the passes code-generating backends ask for (Backend.passes);
#    the compiler runs PIPELINE + backend.passes
CODEGEN: list[tuple[str, PassFn]] = [
    ("fuse_qkv_rope", fuse_qkv_rope),
    ("fuse_glu", fuse_glu),
    ("fuse_add_rms_norm", fuse_add_rms_norm),
    ("plan_memory", plan_memory_pass),
]

# -- training: forward + loss + backward (reft.passes.differentiate.build_train_graph). No weight
#    transforms (gradients keep the checkpoint's parameter names), no quantization, no paged KV;
#    CSE only before autodiff (it would merge recomputed layers back into the forward)
TRAIN: list[tuple[str, PassFn]] = [
    ("eliminate_dead_code", eliminate_dead_code),
    ("eliminate_common_subexpressions", eliminate_common_subexpressions),
    ("attach_loss", attach_loss),                    # logits of chosen rows -> chunked cross-entropy over all rows
    ("add_lora", add_lora),                          # option lora: low-rank adapters, only they train
    ("differentiate", differentiate),                # options: trainable, gradient_checkpointing
    ("eliminate_dead_code", eliminate_dead_code),
]

# -- the optimizer update, appended to TRAIN for the fused `train_step` entry, or run alone on the
#    `apply_update` entry whose gradients are inputs (grad accumulation; reft.compiler.build_train_entries)
OPTIMIZER: list[tuple[str, PassFn]] = [
    ("add_optimizer", add_optimizer),                # option optimizer: clipping + AdamW, params written in place
]

# -- evaluation: the loss of a batch, no backward (the `eval_loss` entry)
EVAL: list[tuple[str, PassFn]] = [
    ("eliminate_dead_code", eliminate_dead_code),
    ("eliminate_common_subexpressions", eliminate_common_subexpressions),
    ("attach_loss", attach_loss),
    ("add_lora", add_lora_eval),                     # the adapters without dropout
    ("eliminate_dead_code", eliminate_dead_code),
]
