"""Every registered op has a cpu lowering, or its OpDef says it is reference-only; and the op facts the
passes and backends read live in the OpDefs."""
from strategies import AWAITING_CPU_KERNELS

from reft.backends.cpu.lower import EMITTERS, PACKED_READERS, lowers
from reft.ir import ops
from reft.ir.ops.registry import quantized_weight_inputs


def test_every_op_is_lowered_by_the_cpu_backend_or_reference_only():
    """Backward and loss ops registered before their kernels (tests/strategies_grad.py
    AWAITING_CPU_KERNELS) are tolerated until they land."""
    missing = [n for n, d in ops.REGISTRY.items()
               if not d.reference_only and not lowers(n) and n not in AWAITING_CPU_KERNELS]
    assert not missing, f"ops without a cpu lowering (lower it, or register it with reference_only=True): {missing}"
    assert set(EMITTERS) <= set(ops.REGISTRY), "an emitter for an op that is not registered"


def test_op_facts_live_in_the_registry():
    assert quantized_weight_inputs() == {"linear": 1, "linear_glu": 1, "qkv_rope": 1, "embedding": 1,
                                         "linear_grad_input": 1, "expert_linear": 3, "expert_glu": 3,
                                         "expert_linear_sum": 4}
    assert PACKED_READERS == {k: v for k, v in quantized_weight_inputs().items() if k != "linear_grad_input"}
    assert ops.get("reshape").aliases == {0: 0}
    assert ops.get("kv_cache_write").aliases == {0: 0, 1: 1}
    assert ops.get("add").vjp is not None and ops.get("kv_cache_write").vjp is None   # gradient rules
