"""Storage: what keeping checkpoints costs, pre-filled from the open run when there is one."""

from __future__ import annotations

import streamlit as st

import cached
import charts
import state
from analysis.errors import AnalysisError
from analysis.prune import POLICY_SYNTAX, apply_prune, parse_policy, plan_prune, prune_rows
from analysis.storage import KeepPolicy, estimate_storage, human_bytes

st.title("Storage planner")
defaults = {"params": 7e9, "dtype": "bf16", "every": 1000, "step_time": 1.5, "window": None}
measured = None
now = None
path = state.run_path()
if path is not None:
    try:
        now = cached.current(path)
        given = cached.storage_inputs(now.path, now.stamp)   # what `storage --run` takes from the run
        found = {"params": given.params, "dtype": given.dtype, "every": given.every_steps,
                 "step_time": given.step_time_s, "window": given.window}
        defaults.update({key: value for key, value in found.items() if value is not None})
        measured = given.measured
        st.caption(f"Pre-filled from {now.run.name}: {defaults['params']:,.0f} parameters, a checkpoint every "
                   f"{defaults['every']} steps, {defaults['step_time']:.3f} s per step.")
    except AnalysisError as e:
        now = None
        st.caption(f"Could not pre-fill from the open run: {e}")

left, right = st.columns(2)
params = left.number_input("Parameters", min_value=1.0, value=defaults["params"], format="%.4g", key="st_params")
dtype = left.selectbox("Weights dtype", ["fp32", "bf16", "fp16", "fp8", "int4"],
                       index=["fp32", "bf16", "fp16", "fp8", "int4"].index(defaults["dtype"]), key="st_dtype")
optimizer = left.selectbox("Optimizer state saved", ["adamw", "sgd", "adafactor", "none"], key="st_opt")
ema = left.toggle("EMA copy in each checkpoint", key="st_ema")
policy_kind = right.selectbox("Keep policy", ["last", "every", "topk", "budget"], key="st_policy",
                              format_func={"last": "the last N", "every": "every K steps + the last N",
                                           "topk": "top-k by validation + the newest", "budget": "a disk budget"}.get)
last = right.number_input("N (last kept)", 1, 10_000, 20, key="st_last")
keep_every = right.number_input("K (steps)", 1, 10**9, 10 * defaults["every"], key="st_every_k") if policy_kind == "every" else None
top_k = right.number_input("k (best kept)", 1, 1000, 5, key="st_topk") if policy_kind == "topk" else None
budget_tb = right.number_input("Budget (TB)", 0.001, 1e6, 1.0, key="st_budget") if policy_kind == "budget" else None
full_last = right.number_input("Optimizer state only in the newest (0 = all)", 0, 10_000, 0, key="st_full")
cols = st.columns(4)
bandwidth = cols[0].number_input("Write bandwidth (GB/s)", 0.01, 1000.0, 2.0, key="st_bw")
step_time = cols[1].number_input("Step time (s)", 0.0001, 1e5, defaults["step_time"], format="%.4f", key="st_step")
every = cols[2].number_input("Steps between saves", 1, 10**9, defaults["every"], key="st_every")
price = cols[3].number_input("USD per TB-month", 0.0, 1000.0, 23.0, key="st_price")
asynchronous = st.toggle("Asynchronous checkpointing (snapshot to host, write in the background)", key="st_async")

policy = KeepPolicy(kind=policy_kind, last=int(last), keep_every_steps=keep_every, top_k=top_k,
                    budget_bytes=budget_tb * 1e12 if budget_tb else None, full_state_last=int(full_last) or None)
try:
    est = estimate_storage(params, dtype, optimizer, int(last), bandwidth, step_time, int(every), ema, price,
                           policy=policy, asynchronous=asynchronous, window=defaults["window"])
except AnalysisError as e:
    st.error(str(e))
    st.stop()

m = st.columns(4)
m[0].metric("per checkpoint (full state)", human_bytes(est.per_checkpoint_bytes))
m[1].metric(f"{est.kept} kept", human_bytes(est.total_bytes))
m[2].metric("per month", f"${est.monthly_cost:,.2f}")
m[3].metric("training time lost to saves", f"{100 * est.overhead_fraction:.2f} %" if est.overhead_fraction is not None else "—")
if est.window:
    st.caption(f"The recommended averaging window needs {est.window} checkpoints: "
               f"{human_bytes(est.window_bytes)} as weights only.")
if measured is not None:
    st.info(f"Measured in this run's logs: {measured.saves_seen} saves, a typical step "
            f"{measured.median_step_seconds:.3f} s, {measured.stall_seconds:.2f} s extra around each save: "
            f"{100 * measured.overhead_fraction:.2f} % of wall time.")
left, right = st.columns(2)
left.plotly_chart(charts.storage_figure(est), key="storage_bytes")
series = [estimate_storage(params, dtype, optimizer, n, bandwidth, step_time, int(every), ema, price)
          for n in range(1, max(int(last), 10) * 2 + 1)]
right.plotly_chart(charts.retention_figure(series), key="storage_retention")
with st.expander("The arithmetic", expanded=True):
    st.code("\n".join(est.arithmetic), language="text")


def prune_section(now: cached.Current) -> None:
    """The same plan as `ckpt-select prune` on the run's real files, applied only behind a confirmation."""
    st.header("Keep only what matters")
    st.caption(f"Policy terms, most important first: {POLICY_SYNTAX}. The newest checkpoint, one being written or "
               "modified in the last minute, and one a recipe in the run names are always kept (docs/prune.md).")
    left, right = st.columns(2)
    text = left.text_input("Keep", "window+1,newest:2,optimizer", key="prune_keep")
    budget = right.text_input("Byte budget (optional, e.g. 2TB)", "", key="prune_budget")
    rec = state.searched_recommendation(now.path, now.stamp) or now.recommendation
    try:
        policy = parse_policy(text, budget.strip() or None)
        plan = plan_prune(now.run, policy, rec if policy.has("window") else None, root=state.root())
    except AnalysisError as e:
        st.error(str(e))
        return
    m = st.columns(3)
    m[0].metric("checkpoints now", human_bytes(plan.bytes_now))
    m[1].metric("after the prune", human_bytes(plan.bytes_after))
    m[2].metric(f"freed ({len(plan.deleted)} deleted)", human_bytes(plan.bytes_freed))
    for note in plan.notes:
        st.caption(note)
    rows = [{"step": r["step"], "checkpoint": r["path"], "size": r["size"], "action": r["action"],
             "why": "; ".join(r["reasons"])} for r in prune_rows(plan)]
    st.dataframe(rows, key="prune_table", hide_index=True)
    if state.root() is not None and not state.allow_prune():
        st.caption("This server was started with --root and without --allow-prune: it will not delete checkpoints.")
    confirm = st.checkbox(f"Delete the {len(plan.deleted)} checkpoints marked delete ({human_bytes(plan.bytes_freed)})",
                          key="prune_confirm")
    if st.button("Delete them", key="prune_button", disabled=not (confirm and plan.deleted)):
        try:
            result = apply_prune(plan, root=state.root(), allow_prune=state.allow_prune())
        except AnalysisError as e:
            st.error(str(e))
            return
        st.success(f"Deleted {len(result.moved)} checkpoints, freed {human_bytes(result.bytes_freed)}.")
        for item, why in result.skipped:
            st.warning(f"{item.path.name}: {why}")


if now is not None:
    prune_section(now)
