"""Learning-rate schedules: `constant`, `linear`, `cosine`, `step`, each after a linear warmup.

`LRSchedule(...).lr(step)` is the learning rate of optimizer step `step` (0-based), the value
transformers' LambdaLR schedulers hold while that step runs, so with `decay_frac` 0 `linear` and
`cosine` equal `get_linear_schedule_with_warmup` / `get_cosine_schedule_with_warmup` and
`constant` equals `get_constant_schedule_with_warmup`:

  warmup   step < W:  peak * step / W          (the first step of a warmup runs at lr 0, as there)
  constant            peak
  linear              peak * (f + (1 - f) * max(0, (N - step) / (N - W)))
  cosine              peak * (f + (1 - f) * max(0, (1 + cos(pi * (step - W) / (N - W))) / 2))
  step                peak * max(f, gamma ** ((step - W) // step_size))

N = total_steps, W = warmup_steps, f = decay_frac (`--learning-rate-decay-frac`: the final lr as a
fraction of the peak; `constant` ignores it). `step` decays by `gamma` every `step_size` steps
(default: a third of the steps after warmup) and never below f * peak when f > 0.
A schedule is a pure function of the step: resuming needs only the step count, and
`state_dict()` records the settings so a resumed run can check they did not change.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ...errors import ReftError

KINDS = ("constant", "linear", "cosine", "step")


@dataclass(frozen=True)
class LRSchedule:
    kind: str
    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    decay_frac: float = 0.0
    step_size: int | None = None   # `step` only
    gamma: float = 0.1             # `step` only

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ReftError(f"unknown lr scheduler {self.kind!r}; choose one of {', '.join(KINDS)}")
        if not self.peak_lr > 0:
            raise ReftError(f"the learning rate must be positive, got {self.peak_lr}")
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise ReftError(f"bad schedule length: {self.total_steps} steps, {self.warmup_steps} warmup steps")
        if not 0.0 <= self.decay_frac <= 1.0:
            raise ReftError(f"--learning-rate-decay-frac must be in [0, 1], got {self.decay_frac}")
        if self.step_size is not None and self.step_size < 1 or not 0 < self.gamma <= 1:
            raise ReftError(f"step schedule: step_size {self.step_size} must be >= 1 and gamma {self.gamma} in (0, 1]")

    def factor(self, step: int) -> float:
        """lr(step) / peak_lr."""
        W, N, f = self.warmup_steps, self.total_steps, self.decay_frac
        if step < W:
            return step / max(1, W)
        if self.kind == "constant":
            return 1.0
        if self.kind == "linear":
            return f + (1 - f) * max(0.0, (N - step) / max(1, N - W))
        if self.kind == "cosine":
            progress = min(1.0, (step - W) / max(1, N - W))
            return f + (1 - f) * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        size = self.step_size or max(1, (N - W) // 3)
        return max(f, self.gamma ** ((step - W) // size))

    def lr(self, step: int) -> float:
        return self.peak_lr * self.factor(step)

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, d: dict) -> "LRSchedule":
        return cls(**d)
