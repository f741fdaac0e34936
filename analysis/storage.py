"""What keeping checkpoints costs: bytes, money, and training time.

Everything here is arithmetic on a parameter count, shown with its terms, because
the usual back-of-envelope numbers are off by 2x in both directions (bytes per
parameter of weights vs full training state): a 7B model is 14 GB of bf16 weights,
28 GB of fp32 weights, and 98 GB with bf16 weights plus fp32 AdamW state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidArgument
from .scaling import TOKENS_PER_PARAM

if TYPE_CHECKING:
    from .selection import Recommendation
    from .run import Run

# Bytes per parameter of the stored weights.
DTYPE_BYTES_PER_PARAM: dict[str, float] = {
    "float32": 4.0, "fp32": 4.0, "bfloat16": 2.0, "bf16": 2.0, "float16": 2.0, "fp16": 2.0,
    "fp8": 1.0, "float8": 1.0, "int8": 1.0, "int4": 0.5,
}
OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "none")
POLICIES = ("last", "every", "topk", "budget")
# Default storage price, USD per TB-month: AWS S3 Standard (us-east-1, first 50 TB) lists
# $0.023 per GB-month, the same list price since 2016 and still so in 2025 (aws.amazon.com/s3/pricing).
# Cold tiers cost a fraction of it; pass your own price.
DEFAULT_PRICE_PER_TB_MONTH = 23.0
# Asynchronous checkpointing first copies the state to host memory (the part that stalls
# training), then writes it in the background: one PCIe 4.0 x16 link moves about 25 GB/s.
DEFAULT_SNAPSHOT_GBPS = 25.0
GB = 1e9
# A checkpoint's main floating dtype -> the planner's name for its bytes per parameter.
_PLANNER_DTYPES = {"float32": "fp32", "float64": "fp32", "bfloat16": "bf16", "float16": "fp16",
                   "float8_e4m3fn": "fp8", "float8_e5m2": "fp8"}


@dataclass(frozen=True, slots=True)
class KeepPolicy:
    """Which checkpoints are kept (parameters only; see :func:`count_kept`).

    kind: ``last`` (the newest ``last``), ``every`` (each multiple of ``keep_every_steps``
    plus the newest ``last``), ``topk`` (the ``top_k`` best by validation plus the newest,
    to resume) or ``budget`` (as many as fit in ``budget_bytes``).
    """

    kind: str = "last"
    last: int = 20
    keep_every_steps: int | None = None
    top_k: int | None = None
    budget_bytes: float | None = None
    total_steps: int | None = None        # run length: caps the count at the saves made
    full_state_last: int | None = None    # only the newest N keep optimizer state; None = all


@dataclass(frozen=True, slots=True)
class KeptCheckpoints:
    """How many checkpoints a policy keeps, and why."""

    full: int            # with optimizer state (resumable)
    weights_only: int    # weights (+ EMA) only: enough to average, not to resume
    note: str            # the arithmetic, one sentence

    @property
    def total(self) -> int:
        return self.full + self.weights_only


@dataclass(frozen=True, slots=True)
class StorageEstimate:
    """The cost of keeping checkpoints of one model, with its terms."""

    params: float
    dtype: str
    optimizer: str
    weights_bytes: float        # per checkpoint
    optimizer_bytes: float      # per checkpoint, master copy included (0 when only weights are kept)
    ema_bytes: float            # per checkpoint (0 without an EMA copy)
    kept: int
    price_per_tb_month: float
    bandwidth_gbps: float       # write bandwidth, gigabytes per second
    step_time_s: float | None
    every_steps: int | None     # steps between saves
    master_bytes: float = 0.0   # the fp32 master copy inside optimizer_bytes
    kept_full: int | None = None          # of ``kept``, how many with optimizer state (None = all)
    policy: str = "last"
    policy_note: str = ""
    asynchronous: bool = False
    snapshot_gbps: float = DEFAULT_SNAPSHOT_GBPS
    window: int | None = None   # checkpoints an averaging window needs
    arithmetic: tuple[str, ...] = field(default_factory=tuple)

    @property
    def per_checkpoint_bytes(self) -> float:
        """A full training-state checkpoint: weights + optimizer state + EMA."""
        return self.weights_bytes + self.optimizer_bytes + self.ema_bytes

    @property
    def weights_only_bytes(self) -> float:
        """A checkpoint without optimizer state (the EMA copy, if any, is kept: it is averaged too)."""
        return self.weights_bytes + self.ema_bytes

    @property
    def total_bytes(self) -> float:
        full = self.kept if self.kept_full is None else self.kept_full
        return full * self.per_checkpoint_bytes + (self.kept - full) * self.weights_only_bytes

    @property
    def monthly_cost(self) -> float:
        """USD per month to keep ``kept`` checkpoints."""
        return self.total_bytes / 1e12 * self.price_per_tb_month

    @property
    def write_seconds(self) -> float:
        """Seconds to write one full checkpoint at the bandwidth."""
        return self.per_checkpoint_bytes / (self.bandwidth_gbps * GB)

    @property
    def interval_seconds(self) -> float | None:
        """Training seconds between two saves."""
        if not self.step_time_s or not self.every_steps:
            return None
        return self.step_time_s * self.every_steps

    @property
    def stall_seconds(self) -> float:
        """Training time lost per save.

        Synchronous: the whole write. Asynchronous: the copy to host memory, plus any part
        of the background write still running when the next save is due.
        """
        if not self.asynchronous:
            return self.write_seconds
        snapshot = self.per_checkpoint_bytes / (self.snapshot_gbps * GB)
        backlog = max(0.0, self.write_seconds - self.interval_seconds) if self.interval_seconds else 0.0
        return snapshot + backlog

    @property
    def overhead_fraction(self) -> float | None:
        """Share of wall time spent stalled by saves, given step time and interval."""
        if self.interval_seconds is None:
            return None
        return self.stall_seconds / (self.interval_seconds + self.stall_seconds)

    @property
    def window_bytes(self) -> float | None:
        """Bytes of the checkpoints an averaging window needs (weights only suffice)."""
        return None if self.window is None else self.window * self.weights_only_bytes

    @property
    def chinchilla_tokens(self) -> float:
        return TOKENS_PER_PARAM * self.params


@dataclass(frozen=True, slots=True)
class MeasuredOverhead:
    """Checkpoint stalls seen in a run's own step times."""

    saves_seen: int               # checkpoints with a logged step at and after them
    median_step_seconds: float    # a typical step away from saves
    stall_seconds: float          # mean extra time of the steps around a save
    interval_steps: float         # median steps between saves
    overhead_fraction: float      # stall / (interval x step time + stall)


def optimizer_bytes_per_param(optimizer: str, dtype: str, factored_per_param: float | None = None) -> float:
    """Bytes per parameter of optimizer state saved with a full checkpoint.

    Every optimizer keeps an fp32 master copy (4 B) when the weights are stored below fp32
    (mixed precision), then its own state: AdamW two fp32 moments (8 B), SGD one fp32
    momentum (4 B), Adafactor (no first moment, as in its default) factored second moments:
    rows + columns per matrix, ``factored_per_param`` fp32 elements per parameter.
    So AdamW is 12 B for bf16 weights and 8 B for pure fp32 training.

    Args:
        optimizer: adamw, adam, sgd, adafactor or none.
        dtype: the weights' dtype (a key of DTYPE_BYTES_PER_PARAM).
        factored_per_param: Adafactor state elements per parameter (from the config's shapes).

    Raises:
        InvalidArgument: unknown optimizer.
    """
    if optimizer not in OPTIMIZERS:
        raise InvalidArgument(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if optimizer == "none":
        return 0.0
    master = 0.0 if DTYPE_BYTES_PER_PARAM[dtype] >= 4.0 else 4.0
    state = {"adamw": 8.0, "adam": 8.0, "sgd": 4.0}.get(optimizer)
    if state is None:
        state = 4.0 * (factored_per_param if factored_per_param is not None else 0.0)
    return master + state


def adafactor_elements_per_param(params: float) -> float:
    """Adafactor state per parameter when only the count is known.

    Assumes square d x d matrices with params = 12 * layers * d^2 and layers = d / 128
    (the depth/width ratio of Llama-class models), so d = (128 * params / 12) ** (1/3)
    and each matrix keeps d + d of its d * d elements: 2 / d per parameter.
    """
    width = (128.0 * params / 12.0) ** (1.0 / 3.0)
    return 2.0 / max(width, 1.0)


def count_kept(policy: KeepPolicy, every_steps: int | None, full_bytes: float,
               weights_only_bytes: float) -> KeptCheckpoints:
    """How many checkpoints a keep policy holds at the end of the run.

    Args:
        policy: the policy.
        every_steps: steps between saves (needed by ``every``, and to count saves).
        full_bytes: one checkpoint with optimizer state.
        weights_only_bytes: one checkpoint without it.

    Returns:
        :class:`KeptCheckpoints`: how many with and without optimizer state, and the arithmetic.

    Raises:
        InvalidArgument: the policy lacks a number it needs.
    """
    saves = policy.total_steps // every_steps if policy.total_steps and every_steps else None
    if policy.kind == "last":
        n, note = policy.last, f"the newest {policy.last}"
    elif policy.kind == "every":
        n, note = _count_every(policy, every_steps, saves)
    elif policy.kind == "topk":
        if not policy.top_k or policy.top_k < 1:
            raise InvalidArgument("the topk policy needs top_k >= 1 (--top-k)")
        n = policy.top_k + 1
        note = f"the {policy.top_k} best by validation + the newest, to resume (worst case: it is not among them)"
    elif policy.kind == "budget":
        return _count_budget(policy, full_bytes, weights_only_bytes, saves)
    else:
        raise InvalidArgument(f"policy must be one of {', '.join(POLICIES)}, got {policy.kind!r}")
    if saves is not None and n > saves:
        n, note = saves, note + f", capped at the {saves} saves of {policy.total_steps} steps"
    return _split_full(policy, n, note)


def _count_every(policy: KeepPolicy, every_steps: int | None, saves: int | None) -> tuple[int, str]:
    """Every multiple of K among the saves, plus the newest N, without counting a save twice."""
    k = policy.keep_every_steps
    if not k or not every_steps or saves is None:
        raise InvalidArgument("the every policy needs keep_every_steps, every_steps and total_steps "
                              "(--keep-every, --every, --total-steps)")
    lcm = k * every_steps // math.gcd(k, every_steps)
    permanent = policy.total_steps // lcm
    last = min(policy.last, saves)
    first_recent = (saves - last + 1) * every_steps
    overlap = policy.total_steps // lcm - (first_recent - 1) // lcm
    n = permanent + last - overlap
    return n, (f"{permanent} saves at multiples of {k} steps + the newest {last} "
               f"- {overlap} counted twice, over {saves} saves")


def _count_budget(policy: KeepPolicy, full_bytes: float, weights_only_bytes: float,
                  saves: int | None) -> KeptCheckpoints:
    """As many as fit: the resumable ones first, weights-only ones in the rest."""
    if not policy.budget_bytes or policy.budget_bytes <= 0:
        raise InvalidArgument("the budget policy needs a positive budget (--budget-tb)")
    budget = policy.budget_bytes
    m = policy.full_state_last
    if m is None or m * full_bytes >= budget:
        n = int(budget // full_bytes)
        full, light = n, 0
    else:
        full, light = m, int((budget - m * full_bytes) // weights_only_bytes)
    if saves is not None:
        full = min(full, saves)
        light = min(light, saves - full)
    note = (f"{budget / 1e12:g} TB holds {full} full checkpoints of {full_bytes / GB:.2f} GB"
            + (f" + {light} weights-only of {weights_only_bytes / GB:.2f} GB" if light else ""))
    return KeptCheckpoints(full, light, note)


def _split_full(policy: KeepPolicy, n: int, note: str) -> KeptCheckpoints:
    full = n if policy.full_state_last is None else min(n, policy.full_state_last)
    if full < n:
        note += f"; optimizer state only in the newest {full}"
    return KeptCheckpoints(full, n - full, note)


def estimate_storage(params: float, dtype: str = "bf16", optimizer: str = "adamw", keep: int = 20,
                     bandwidth_gbps: float = 2.0, step_time_s: float | None = None, every_steps: int | None = None,
                     ema: bool = False, price_per_tb_month: float = DEFAULT_PRICE_PER_TB_MONTH, *,
                     policy: KeepPolicy | None = None, asynchronous: bool = False,
                     snapshot_gbps: float = DEFAULT_SNAPSHOT_GBPS, window: int | None = None,
                     factored_elements: int | None = None) -> StorageEstimate:
    """Estimate what keeping checkpoints of a ``params``-parameter model costs.

    Args:
        params: parameter count (see :func:`analysis.model_size.count_parameters`).
        dtype: dtype of the stored weights.
        optimizer: optimizer whose state a full checkpoint holds (adamw, adam, sgd, adafactor, none).
        keep: checkpoints kept, when no ``policy`` is given (the newest ``keep``).
        bandwidth_gbps: write bandwidth to the checkpoint store, GB/s.
        step_time_s: seconds per training step (for the overhead share).
        every_steps: steps between saves.
        ema: each checkpoint also holds an fp32 EMA copy of the weights.
        price_per_tb_month: USD per TB-month (default: S3 Standard list price).
        policy: a keep policy; overrides ``keep``.
        asynchronous: saves are staged to host memory and written in the background.
        snapshot_gbps: device-to-host copy bandwidth of asynchronous saves, GB/s.
        window: checkpoints an averaging window needs (e.g. ``len(recommendation.checkpoints)``).
        factored_elements: Adafactor state elements (from the config's shapes; estimated if None).

    Returns:
        A :class:`StorageEstimate`; its properties give totals, cost and time.

    Raises:
        InvalidArgument: non-positive sizes, unknown dtype, optimizer or policy.
    """
    if params <= 0 or keep < 0 or bandwidth_gbps <= 0 or snapshot_gbps <= 0:
        raise InvalidArgument("params and bandwidth must be positive and keep non-negative")
    if dtype not in DTYPE_BYTES_PER_PARAM:
        raise InvalidArgument(f"dtype must be one of {', '.join(DTYPE_BYTES_PER_PARAM)}, got {dtype!r}")
    if price_per_tb_month < 0 or (window is not None and window < 1) or (every_steps is not None and every_steps < 1):
        raise InvalidArgument("price must be non-negative, window and every_steps at least 1")
    factored = factored_elements / params if factored_elements else adafactor_elements_per_param(params)
    opt_per_param = optimizer_bytes_per_param(optimizer, dtype, factored)
    master = 4.0 if opt_per_param and DTYPE_BYTES_PER_PARAM[dtype] < 4.0 else 0.0
    weights, ema_bytes = params * DTYPE_BYTES_PER_PARAM[dtype], (params * 4.0 if ema else 0.0)
    policy = policy or KeepPolicy(kind="last", last=keep)
    kept = count_kept(policy, every_steps, weights + params * opt_per_param + ema_bytes, weights + ema_bytes)
    est = StorageEstimate(
        params=float(params), dtype=dtype, optimizer=optimizer, weights_bytes=weights,
        optimizer_bytes=params * opt_per_param, ema_bytes=ema_bytes, kept=kept.total,
        price_per_tb_month=price_per_tb_month, bandwidth_gbps=bandwidth_gbps, step_time_s=step_time_s,
        every_steps=every_steps, master_bytes=params * master, kept_full=kept.full, policy=policy.kind,
        policy_note=kept.note, asynchronous=asynchronous, snapshot_gbps=snapshot_gbps, window=window,
    )
    return _with_arithmetic(est, opt_per_param, master)


def _with_arithmetic(est: StorageEstimate, opt_per_param: float, master: float) -> StorageEstimate:
    """The estimate with its arithmetic written out, one line per term (shown in CLI and UI)."""
    p, gb = est.params, human_bytes
    lines = [f"weights: {p:.4g} params x {DTYPE_BYTES_PER_PARAM[est.dtype]:g} B ({est.dtype}) = {gb(est.weights_bytes)}"]
    if est.optimizer != "none":
        lines.append(f"optimizer ({est.optimizer}): {p:.4g} x {opt_per_param:.4g} B "
                     f"(fp32 master {master:g} B + state {opt_per_param - master:.4g} B) = {gb(est.optimizer_bytes)}")
    if est.ema_bytes:
        lines.append(f"EMA copy: {p:.4g} x 4 B (fp32) = {gb(est.ema_bytes)}")
    lines.append(f"per checkpoint: full state {gb(est.per_checkpoint_bytes)}, weights only {gb(est.weights_only_bytes)}")
    lines.append(f"kept ({est.policy}): {est.kept} = {est.policy_note}; total {human_bytes(est.total_bytes)} "
                 f"x ${est.price_per_tb_month:g}/TB-month = ${est.monthly_cost:,.2f}/month")
    lines.append(f"one save: {gb(est.per_checkpoint_bytes)} / {est.bandwidth_gbps:g} GB/s = {est.write_seconds:,.1f} s; "
                 f"training stalls {est.stall_seconds:,.1f} s ({'async' if est.asynchronous else 'sync'})")
    if est.overhead_fraction is not None:
        lines.append(f"overhead: {est.stall_seconds:,.1f} s / ({est.every_steps} steps x {est.step_time_s:g} s "
                     f"+ {est.stall_seconds:,.1f} s) = {100 * est.overhead_fraction:.2f}% of wall time")
    return replace(est, arithmetic=tuple(lines))


def human_bytes(size: float) -> str:
    """Decimal units (1 GB = 1e9 bytes), as disks and cloud bills count."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(size) >= scale:
            return f"{size / scale:,.2f} {unit}"
    return f"{size:,.0f} B"


def measure_checkpoint_overhead(run: Run) -> MeasuredOverhead | None:
    """Checkpoint stalls measured from the run's own ``step_time_ms`` log.

    A save made after step s shows up in the time logged at s or at the next logged
    step (loggers differ), so the larger of the two, minus the median step time away from
    saves, is that save's stall.

    Args:
        run: an open run with ``step_time_ms`` logged and checkpoints found.

    Returns:
        :class:`MeasuredOverhead`, or None without step timings around any checkpoint.
    """
    times = run.metric("step_time_ms")
    steps = [c.step for c in run.checkpoints]
    if len(times) < 5 or not steps:
        return None
    step_arr = times["step"].to_numpy()
    secs = times["value"].to_numpy(dtype=float) / 1000.0
    near: list[tuple[int, int]] = []
    for s in steps:
        i = int(np.searchsorted(step_arr, s))
        # A save with no logged step after it (the run's last) cannot show its stall: skipped.
        if i + 1 < len(step_arr) and step_arr[i] - s <= 1:
            near.append((i, i + 1))
    if not near:
        return None
    touched = np.zeros(len(secs), dtype=bool)
    for i, j in near:
        touched[[i, j]] = True
    median = float(np.nanmedian(secs[~touched])) if (~touched).any() else float(np.nanmedian(secs))
    stall = float(np.mean([max(0.0, max(secs[i], secs[j]) - median) for i, j in near]))
    interval = float(np.median(np.diff(steps))) if len(steps) > 1 else float(steps[0])
    fraction = stall / (interval * median + stall) if interval * median + stall > 0 else 0.0
    return MeasuredOverhead(len(near), median, stall, interval, fraction)


@dataclass(frozen=True, slots=True)
class RunStorageInputs:
    """What a run tells the storage planner: the defaults of ``storage --run`` and of the Storage page.

    None where the run does not say (no checkpoint, no logged step time): the user gives it.
    """

    params: float | None        # floating elements of the newest checkpoint
    dtype: str | None           # its main floating dtype, as the planner names it (fp32, bf16, fp16, fp8)
    every_steps: int | None     # median steps between two checkpoints
    step_time_s: float | None   # median logged ``step_time_ms``, in seconds
    window: int | None          # checkpoints the recommended average takes
    measured: MeasuredOverhead | None


def storage_inputs_from_run(run: Run, recommendation: Recommendation | None = None) -> RunStorageInputs:
    """The storage planner's inputs read from a run: one rule for the CLI and the app (issue 20).

    Args:
        run: an open run.
        recommendation: the run's recommendation when the caller has it (the app caches one); else
            the default one is made (it reads every checkpoint's header and logs).

    Raises:
        AnalysisError: a checkpoint cannot be read, or the recommendation fails.
    """
    params, dtype = _newest_weights(run)
    steps = [c.step for c in run.checkpoints]
    every = int(np.median(np.diff(steps))) if len(steps) > 1 else None
    times = run.metric("step_time_ms")["value"].to_numpy(dtype=float)
    step_time = float(np.nanmedian(times)) / 1000.0 if np.isfinite(times).any() else None
    if recommendation is None and run.checkpoints:
        from .selection import recommend   # late: only a run's storage plan needs the recommender
        from .signals import assess_run
        recommendation = recommend(assess_run(run))
    window = len(recommendation.checkpoints) if recommendation is not None else None
    return RunStorageInputs(params, dtype, every, step_time, window, measure_checkpoint_overhead(run))


def _newest_weights(run: Run) -> tuple[float | None, str | None]:
    """(floating elements, planner dtype) of the run's newest checkpoint, from its header alone."""
    if not run.checkpoints:
        return None, None
    from .checkpoints import open_checkpoint
    from .checkpoints.base import main_floating_dtype
    newest = run.checkpoints[-1]
    with open_checkpoint(newest.path, newest.layout) as handle:
        infos = handle.tensors()
    params = sum(i.numel for i in infos if i.is_floating)
    main = main_floating_dtype(infos)
    return (float(params) or None), (_PLANNER_DTYPES.get(main) if main else None)
