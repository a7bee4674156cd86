"""The options of a training run (`reft train`), checked, and what follows from them alone.

  TrainArgs          every option, with reft.cpp / LLaMA-Factory's defaults where they have one
  freeze_trainable   --fine-tuning-type freeze: the parameters of the last N (N < 0: first |N|) layers
  run_identity       the options a resumed run must share with its checkpoint (fingerprinted)
  schedule_matches   whether a resumed run's lr schedule continues the checkpoint's

Notable:
- freeze trains the chosen decoder layers only, as LLaMA-Factory's `freeze_trainable_layers` does
  (its `freeze_extra_modules` is empty by default): embeddings, final norm and LM head stay frozen.
- A run may be resumed with other --max-steps / --epochs only when its schedule does not depend on
  the length (`constant`); cadence options (save, eval, threads, backend, progress) may change.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ...errors import ReftError

STAGES = ("pretrain", "sft")
FINE_TUNING_TYPES = ("full", "freeze", "lora")
LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TrainArgs:
    model: str
    datasets: tuple[str, ...]
    checkpoint_dir: str
    stage: str = "sft"
    fine_tuning_type: str = "lora"
    freeze_trainable_layers: int = 2
    lora_rank: int = 8
    lora_alpha: float | None = None          # None = 2 x rank
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    cutoff_len: int = 1024
    block_size: int = 1024
    batch_size: int = 4
    grad_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    learning_rate_decay_frac: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: float = 3.0
    max_steps: int | None = None
    save_every: int = 500
    eval_every: int = 0
    eval_split: float = 0.0
    save_total_limit: int | None = None
    resume: str | None = None                # a checkpoint folder, or "latest" (the newest in checkpoint_dir)
    seed: int = 42
    chat_template: str | None = None         # a template file or the template text
    threads: int | None = None
    gradient_checkpointing: bool = False
    skip_bad_lines: bool = False
    backend: str | None = None               # None: cpu where it can compile the train graph, else reference
    model_def: str | None = None             # a model-definition .py for an architecture reft does not ship

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank

    def check(self) -> None:
        """Option values that are wrong on their own; each a one-line ReftError."""
        if self.stage not in STAGES:
            raise ReftError(f"--stage {self.stage!r}: choose one of {', '.join(STAGES)}")
        if self.fine_tuning_type not in FINE_TUNING_TYPES:
            raise ReftError(f"--fine-tuning-type {self.fine_tuning_type!r}: choose one of"
                            f" {', '.join(FINE_TUNING_TYPES)}")
        if not self.datasets:
            raise ReftError("give at least one --datasets KIND@PATH (text@, alpaca@ or messages@)")
        kinds = {d.partition("@")[0] for d in self.datasets}
        if self.stage == "pretrain" and kinds - {"text"}:
            raise ReftError(f"--stage pretrain trains on text@PATH datasets, not {sorted(kinds - {'text'})[0]}@")
        if self.stage == "sft" and "text" in kinds:
            raise ReftError("--stage sft trains on alpaca@PATH or messages@PATH datasets;"
                            " text@ is for --stage pretrain")
        for name, v in (("--batch-size", self.batch_size), ("--grad-accumulation-steps", self.grad_accumulation_steps),
                        ("--save-every", self.save_every)):
            if v < 1:
                raise ReftError(f"{name} must be at least 1, got {v}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ReftError(f"--max-steps must be at least 1, got {self.max_steps}")
        if not self.epochs > 0:
            raise ReftError(f"--epochs must be positive, got {self.epochs}")
        if self.eval_every < 0 or self.eval_split < 0:
            raise ReftError("--eval-every and --eval-split must not be negative")
        if self.eval_every and not self.eval_split:
            raise ReftError("--eval-every needs --eval-split (the fraction or number of examples held out)")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ReftError("--weight-decay and --max-grad-norm must not be negative")
        if self.fine_tuning_type == "freeze" and self.freeze_trainable_layers == 0:
            raise ReftError("--freeze-trainable-layers 0 trains nothing;"
                            " give N > 0 (last N layers) or N < 0 (first |N|)")


def freeze_trainable(param_names, num_layers: int, n: int) -> tuple[str, ...]:
    """The parameters of the last n decoder layers (n < 0: the first |n|)."""
    if abs(n) > num_layers:
        raise ReftError(f"--freeze-trainable-layers {n}: the model has {num_layers} layers")
    layers = set(range(num_layers - n, num_layers)) if n > 0 else set(range(-n))
    return tuple(p for p in param_names if (m := LAYER.match(p)) and int(m.group(1)) in layers)


def run_identity(args: TrainArgs, chat_template: str | None) -> dict:
    """What shapes the math of the run besides the model, the data and the schedule length."""
    d = asdict(args)
    for k in ("model", "datasets", "checkpoint_dir", "epochs", "max_steps", "save_every", "eval_every",
              "save_total_limit", "resume", "threads", "gradient_checkpointing", "skip_bad_lines", "backend",
              "chat_template", "lora_alpha", "model_def"):
        d.pop(k)
    d["lora_alpha"] = args.alpha
    d["chat_template_text"] = chat_template
    if args.fine_tuning_type != "lora":
        for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets"):
            d.pop(k)
    if args.fine_tuning_type != "freeze":
        d.pop("freeze_trainable_layers")
    return d


def schedule_matches(saved: dict, now: dict) -> bool:
    """A resumed schedule equals the saved one (its length may differ only for `constant`)."""
    ignore = {"total_steps"} if now.get("kind") == "constant" else set()
    return {k: v for k, v in saved.items() if k not in ignore} == {k: v for k, v in now.items() if k not in ignore}
