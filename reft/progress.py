"""Progress bars for long work (to stderr; silent when disabled or not a terminal in tests)."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def progress_bar(total: int, desc: str, *, enabled: bool = True, unit: str = "B"):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024, disable=not enabled,
               leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
