"""Learning-rate schedules against transformers' schedulers (decay fraction 0, and cosine's
min_lr_rate) and hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch
import transformers

from reft.errors import ReftError
from reft.runtime.train.schedule import LRSchedule


def hf_lrs(make, steps, **kw):
    """The lr each optimizer step runs at under a transformers scheduler (read before the step)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    sched = make(opt, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 20), (5, 5), (1, 7)])
def test_matches_transformers(warmup, total):
    kw = dict(num_warmup_steps=warmup, num_training_steps=total)
    cases = {
        "linear": hf_lrs(transformers.get_linear_schedule_with_warmup, total, **kw),
        "cosine": hf_lrs(transformers.get_cosine_schedule_with_warmup, total, **kw),
        "constant": hf_lrs(transformers.get_constant_schedule_with_warmup, total, num_warmup_steps=warmup),
    }
    for kind, want in cases.items():
        s = LRSchedule(kind, 3e-4, total, warmup)
        assert [s.lr(i) for i in range(total)] == pytest.approx(want, rel=1e-12, abs=1e-15), kind
    want = hf_lrs(transformers.get_cosine_with_min_lr_schedule_with_warmup, total, min_lr_rate=0.1, **kw)
    s = LRSchedule("cosine", 3e-4, total, warmup, decay_frac=0.1)
    assert [s.lr(i) for i in range(total)] == pytest.approx(want, rel=1e-12)


def test_hand_computed_values():
    lin = LRSchedule("linear", 1.0, total_steps=12, warmup_steps=2, decay_frac=0.1)
    assert [lin.lr(i) for i in (0, 1, 2, 7, 12)] == pytest.approx([0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1])
    cos = LRSchedule("cosine", 2.0, total_steps=10, warmup_steps=0, decay_frac=0.25)
    assert cos.lr(5) == pytest.approx(2.0 * (0.25 + 0.75 * 0.5))
    assert cos.lr(10) == pytest.approx(0.5) and cos.lr(15) == pytest.approx(0.5)   # stays at the floor
    step = LRSchedule("step", 1.0, total_steps=31, warmup_steps=1, step_size=10, gamma=0.5)
    assert [step.lr(i) for i in (0, 1, 10, 11, 21, 30)] == [0.0, 1.0, 1.0, 0.5, 0.25, 0.25]
    floor = LRSchedule("step", 1.0, total_steps=40, gamma=0.1, decay_frac=0.05)   # step_size 13 by default
    assert [floor.lr(i) for i in (0, 13, 26, 39)] == pytest.approx([1.0, 0.1, 0.05, 0.05])
    const = LRSchedule("constant", 1e-3, total_steps=5, warmup_steps=4, decay_frac=0.5)
    assert const.lr(2) == pytest.approx(5e-4) and const.lr(4) == 1e-3
    assert math.isclose(LRSchedule.from_state_dict(lin.state_dict()).lr(7), lin.lr(7))


@pytest.mark.parametrize("kw,match", [
    (dict(kind="exp"), "unknown lr scheduler"), (dict(decay_frac=1.5), "decay-frac"),
    (dict(peak_lr=0.0), "positive"), (dict(total_steps=0), "schedule length"),
    (dict(kind="step", gamma=0.0), "gamma")])
def test_bad_settings_are_errors(kw, match):
    with pytest.raises(ReftError, match=match):
        LRSchedule(**{"kind": "linear", "peak_lr": 1e-3, "total_steps": 10, **kw})
