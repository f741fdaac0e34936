"""Storage arithmetic on hand-computed cases."""

from __future__ import annotations

import pytest

from analysis.errors import InvalidArgument
from analysis.storage import estimate_storage


def test_7b_hand_computed() -> None:
    fp32 = estimate_storage(7e9, "fp32", "none", keep=1)
    assert fp32.weights_bytes == 28e9 and fp32.per_checkpoint_bytes == 28e9
    bf16 = estimate_storage(7e9, "bf16", "adamw", keep=10, bandwidth_gbps=2.0)
    assert bf16.weights_bytes == 14e9
    assert bf16.optimizer_bytes == 84e9          # fp32 master + two fp32 moments = 12 B/param
    assert bf16.total_bytes == 10 * 98e9
    assert bf16.write_seconds == pytest.approx(49.0)
    assert bf16.monthly_cost == pytest.approx(0.98 * 23.0)
    assert bf16.chinchilla_tokens == 140e9


def test_overhead_fraction_of_synchronous_saves() -> None:
    est = estimate_storage(1e9, "bf16", "none", keep=5, bandwidth_gbps=1.0, step_time_s=1.0, every_steps=98)
    assert est.write_seconds == pytest.approx(2.0)
    assert est.overhead_fraction == pytest.approx(2.0 / 100.0)
    assert estimate_storage(1e9).overhead_fraction is None


def test_bad_arguments() -> None:
    with pytest.raises(InvalidArgument, match="dtype"):
        estimate_storage(1e9, "fp13")
    with pytest.raises(InvalidArgument, match="optimizer"):
        estimate_storage(1e9, "bf16", "lion")
    with pytest.raises(InvalidArgument, match="positive"):
        estimate_storage(0)
