"""What keeping checkpoints costs: bytes, money, and training time.

Everything here is arithmetic on a parameter count, shown with its terms, because
the usual back-of-envelope numbers are off by 2x in both directions (bytes per
parameter of weights vs full training state).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidArgument

# Bytes per parameter of the stored weights.
DTYPE_BYTES_PER_PARAM: dict[str, float] = {
    "float32": 4.0, "fp32": 4.0, "bfloat16": 2.0, "bf16": 2.0, "float16": 2.0, "fp16": 2.0,
    "fp8": 1.0, "float8": 1.0, "int8": 1.0, "int4": 0.5,
}
# Default storage price: USD per TB-month, in the range of the big clouds' standard
# object storage in 2026 (S3 Standard is about $23; cold tiers are cheaper). A parameter.
DEFAULT_PRICE_PER_TB_MONTH = 23.0
# Tokens per parameter of a compute-optimal run (Hoffmann et al., 2022).
CHINCHILLA_TOKENS_PER_PARAM = 20.0


@dataclass(frozen=True, slots=True)
class StorageEstimate:
    """The cost of keeping checkpoints of one model, with its terms."""

    params: float
    dtype: str
    optimizer: str
    weights_bytes: float        # per checkpoint
    optimizer_bytes: float      # per checkpoint (0 when only weights are kept)
    ema_bytes: float            # per checkpoint (0 without an EMA copy)
    kept: int
    price_per_tb_month: float
    bandwidth_gbps: float       # write bandwidth, gigabytes per second
    step_time_s: float | None
    every_steps: int | None

    @property
    def per_checkpoint_bytes(self) -> float:
        return self.weights_bytes + self.optimizer_bytes + self.ema_bytes

    @property
    def total_bytes(self) -> float:
        return self.per_checkpoint_bytes * self.kept

    @property
    def monthly_cost(self) -> float:
        """USD per month to keep ``kept`` checkpoints."""
        return self.total_bytes / 1e12 * self.price_per_tb_month

    @property
    def write_seconds(self) -> float:
        """Seconds to write one checkpoint at the bandwidth."""
        return self.per_checkpoint_bytes / (self.bandwidth_gbps * 1e9)

    @property
    def overhead_fraction(self) -> float | None:
        """Share of wall time spent in synchronous saves, given step time and interval."""
        if not self.step_time_s or not self.every_steps:
            return None
        compute = self.step_time_s * self.every_steps
        return self.write_seconds / (compute + self.write_seconds)

    @property
    def chinchilla_tokens(self) -> float:
        return CHINCHILLA_TOKENS_PER_PARAM * self.params


def optimizer_bytes_per_param(optimizer: str, dtype: str) -> float:
    """Bytes per parameter of optimizer state saved with a full checkpoint.

    AdamW keeps two fp32 moments (8 B) and, when the weights are not fp32, an fp32
    master copy (4 B): 12 B for bf16 mixed precision, 8 B for pure fp32 training.
    """
    if optimizer == "none":
        return 0.0
    if optimizer == "adamw":
        return 8.0 + (0.0 if DTYPE_BYTES_PER_PARAM[dtype] == 4.0 else 4.0)
    if optimizer == "sgd":
        return 4.0  # one fp32 momentum buffer
    raise InvalidArgument(f"optimizer must be adamw, sgd or none, got {optimizer!r}")


def estimate_storage(params: float, dtype: str = "bf16", optimizer: str = "adamw", keep: int = 20,
                     bandwidth_gbps: float = 2.0, step_time_s: float | None = None, every_steps: int | None = None,
                     ema: bool = False, price_per_tb_month: float = DEFAULT_PRICE_PER_TB_MONTH) -> StorageEstimate:
    """Estimate what keeping ``keep`` checkpoints of a ``params``-parameter model costs.

    Raises:
        InvalidArgument: non-positive sizes, unknown dtype or optimizer.
    """
    if params <= 0 or keep < 0 or bandwidth_gbps <= 0:
        raise InvalidArgument("params and bandwidth must be positive and keep non-negative")
    if dtype not in DTYPE_BYTES_PER_PARAM:
        raise InvalidArgument(f"dtype must be one of {', '.join(DTYPE_BYTES_PER_PARAM)}, got {dtype!r}")
    weights = params * DTYPE_BYTES_PER_PARAM[dtype]
    return StorageEstimate(
        params=float(params), dtype=dtype, optimizer=optimizer, weights_bytes=weights,
        optimizer_bytes=params * optimizer_bytes_per_param(optimizer, dtype),
        ema_bytes=params * 4.0 if ema else 0.0, kept=keep, price_per_tb_month=price_per_tb_month,
        bandwidth_gbps=bandwidth_gbps, step_time_s=step_time_s, every_steps=every_steps,
    )
