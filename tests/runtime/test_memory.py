"""--kv-cache-memory: sizes, fractions of the memory free where the pool lives, and the errors."""
from __future__ import annotations

import pytest

from reft.backends.cpu.runtime import CpuExecutable
from reft.errors import ReftError
from reft.runtime.engine import Engine
from reft.runtime.kv_cache import PagePool
from reft.runtime.memory import DEFAULT_KV_FRACTION, KvBudget, host_available_memory

PAGE = 4096   # bytes per page in the pure tests


@pytest.mark.parametrize("text, pages", [("2GiB", 2 * 2**30 // PAGE), ("512MB", 512 * 10**6 // PAGE),
                                         ("1e6", 10**6 // PAGE), (" 64 kib ", 16), ("0.25", 10**9 // 4 // PAGE),
                                         ("1", 10**9 // PAGE)])
def test_sizes_and_fractions_of_free_memory(text, pages):
    assert KvBudget(text).pages(PAGE, 16, 4096, free=10**9) == pages


def test_by_default_room_for_every_sequence_capped_by_a_fraction_of_free_memory():
    b = KvBudget(None, max_num_seqs=8)
    assert b.pages(PAGE, 16, 4096, free=10**12) == 8 * 4096 // 16
    assert b.pages(PAGE, 16, 4100, free=10**12) == 8 * 257            # partial pages round up
    assert b.pages(PAGE, 16, 4096, free=10**7) == int(DEFAULT_KV_FRACTION * 10**7) // PAGE


@pytest.mark.parametrize("text", ["lots", "2 GiBs", "-1GiB", "", "1e"])
def test_a_malformed_size_is_one_line_before_anything_loads(text):
    with pytest.raises(ReftError, match=r"^--kv-cache-memory .*give a size such as 2GiB"):
        KvBudget(text)


def test_a_pool_under_two_pages_is_refused():
    with pytest.raises(ReftError, match="--kv-cache-memory 5kB holds 1 KV page"):
        KvBudget("5kB").pages(PAGE, 16, 4096, free=10**9)
    with pytest.raises(ReftError, match=r"default KV cache \(0.2 of 10,000 free bytes\) holds 0 KV page"):
        KvBudget(None, 4).pages(PAGE, 16, 4096, free=10_000)


def test_host_memory_is_read_from_meminfo():
    assert 0 < host_available_memory()


def test_the_engine_sizes_its_pool_from_the_executables_free_memory(stories_plan, monkeypatch):
    """A fraction is of what the loaded executable reports free (host memory here; device memory
    on the cuda backend), read after the plan is loaded."""
    free = 3 * 10**8
    monkeypatch.setattr(CpuExecutable, "free_memory", lambda self: free)
    engine = Engine.load(stories_plan, kv_budget=KvBudget("0.1"))
    page = PagePool.page_bytes(engine.plan.kv)
    assert engine.pool.num_pages == int(0.1 * free) // page
    engine = Engine.load(stories_plan, kv_budget=KvBudget(None, max_num_seqs=3))
    assert engine.pool.num_pages == 3 * -(-engine.context_length // engine.plan.kv["page_size"])
