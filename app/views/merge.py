"""Merge: weights for the selection, an evaluator's score or search, the merge itself, the recipe."""

from __future__ import annotations

import shlex

import streamlit as st

import cached
import charts
import sidebar
import state
from analysis.inputs import normalize_weights
from analysis.errors import AnalysisError
from analysis.merge import plan_merge
from analysis.merge.verify import ARITHMETIC
from analysis.paths import resolve_within
from analysis.recipe import default_merge_folder
from analysis.selection import RecommendConfig, decay_selection, policy_weights, recommend

now = sidebar.current_or_stop()
run, signals, rec = now.run, now.signals, now.recommendation
st.title("Merge")
rec_steps = [r.step for r in rec.checkpoints]
chosen = state.selected_steps()
chosen = rec_steps if chosen is None else sorted(chosen)
if not chosen:
    st.warning("No checkpoint is selected: tick some on the Checkpoints page.")
    st.stop()
reasons = {d.step: d.reason for d in rec.decisions}
taken = tuple((str(s), reasons[s]) for s in chosen)

options = (["recommended"] if chosen == rec_steps else []) + ["sma", "ema", "wma", "decay", "manual"]
method = st.segmented_control("Weights", options, default=options[0], key="weights_method") or options[0]
if method == "recommended":
    weights = tuple(rec.weights)
elif method == "manual":
    edited = st.data_editor([{"step": s, "weight": 1.0} for s in chosen], key=f"manual_{chosen}",
                            hide_index=True, num_rows="fixed", disabled=["step"],
                            column_config={"weight": st.column_config.NumberColumn(min_value=0.0, step=0.05)})
    try:   # the merge's own rule (issue 20): finite, non-negative, a positive sum; scaled to sum to 1
        weights = normalize_weights([row["weight"] for row in edited], len(chosen))
    except AnalysisError as e:
        st.error(f"Manual weights: {e}. Give at least one checkpoint a positive weight.")
        st.stop()
elif method == "decay":   # WSM: the merge of constant-LR checkpoints that acts like an LR decay (issue 24)
    left, right = st.columns(2)
    schedule = left.selectbox("Decay schedule", ["1-sqrt", "linear", "cosine", "exp"], key="decay_schedule",
                              help="The LR decay the merge emulates; weights from the checkpoints' positions in tokens.")
    unit = "tokens" if all(signals.at(s).tokens is not None for s in chosen) else "steps"
    length = right.number_input(f"Window in {unit} (0: the whole selection)", min_value=0.0, value=0.0,
                                key="decay_window", format="%g")
    try:
        decay = decay_selection([signals.at(s) for s in chosen], schedule,
                                length if length and unit == "tokens" else None,
                                int(length) if length and unit == "steps" else None)
    except AnalysisError as e:
        st.error(f"Decay weights: {e}")
        st.stop()
    chosen, weights = list(decay.steps), decay.weights
    taken = tuple((str(s), reasons[s]) for s in chosen)
    settings = (("schedule", schedule),) + ((("window_" + unit, length),) if length else ())
    if decay.describe:
        st.caption(f"The selection's {decay.describe}.")
    st.plotly_chart(charts.decay_figure(run, list(decay.where), list(decay.multiplier), decay.unit, decay.lr_at_start),
                    key="decay_lr_chart")
else:
    alpha = st.slider("EMA alpha (weight of the newest)", 0.05, 1.0, 0.3, 0.05, key="ema_alpha") if method == "ema" else 0.3
    weights = policy_weights(method, len(chosen), alpha)
recipe_method = rec.method if method == "recommended" else method
if method != "decay":
    settings = tuple(rec.settings.items()) if method == "recommended" else ()
st.plotly_chart(charts.weights_figure(chosen, list(weights)), key="weights_chart")

with st.expander("Score the selection, or search for the best average, with an evaluator",
                 expanded=bool(state.evaluator_spec())):
    st.caption("An evaluator is your function `func(state_dict) -> loss` (FILE.py:FUNC), or `hf-lm:VAL.txt`: "
               "the run's Hugging Face model (its config.json and tokenizer) scored on a text file. "
               "It runs only when you press the button." +
               (f" This run ships one: `{run.evaluator_hint}`." if run.evaluator_hint else ""))
    spec = st.text_input("Evaluator", value=state.evaluator_spec() or (run.evaluator_hint or ""), key="eval_spec")
    on_disk = st.checkbox("Keep scores on disk", key="eval_on_disk",
                          help="The score store `recommend --eval-cache` uses: a candidate scored before (same "
                               "evaluator source, same checkpoint files, weights and dtype) is read back, not "
                               "evaluated again. Leave it off if your evaluator reads data that changes.")
    if st.button("Score selection and last checkpoint", key="score_button") and spec:
        state.set_evaluator_spec(spec)
        try:
            evaluator = cached.evaluator(spec, now.path, now.stamp, on_disk)
            refs = [run.checkpoint_at(s) for s in chosen]
            calls_before, read_before = evaluator.calls, evaluator.from_store
            with st.spinner(f"Evaluating with {evaluator.name}..."):
                score = evaluator.score(refs, weights)
                last = evaluator.score([signals.checkpoints[-1].ref], (1.0,))
            read = evaluator.from_store - read_before
            st.session_state["last_scores"] = (tuple(chosen), weights, score, last,
                                               (evaluator.calls - calls_before - read, read) if on_disk else None)
        except AnalysisError as e:
            st.error(str(e))
    budget = st.number_input("Evaluations the search may make", min_value=1, value=2 * len(signals.checkpoints),
                             key="search_budget", help="As `recommend --eval --max-evals N`: the last checkpoint "
                             "alone, the predicted weights, windows, EMAs and a greedy soup, most promising first.")
    if st.button("Search for the best average with it", key="search_button") and spec:
        state.set_evaluator_spec(spec)
        try:
            evaluator = cached.evaluator(spec, now.path, now.stamp, on_disk)
            bar = st.progress(0.0, text=f"Searching with {evaluator.name}...")
            found = recommend(signals, RecommendConfig(max_evals=int(budget)), evaluator,
                              lambda fraction, message: bar.progress(min(max(fraction, 0.0), 1.0), text=message))
            state.set_searched_recommendation(now.path, now.stamp, found)
            st.rerun()
        except AnalysisError as e:
            st.error(str(e))
    if rec.basis == "evaluator":
        st.caption(f"The recommendation on every page is now this search's: {rec.summary}")
        if st.button("Back to the recommendation from the logs", key="search_clear"):
            state.clear_searched_recommendation()
            st.rerun()
    scores = st.session_state.get("last_scores")
    if scores and scores[0] == tuple(chosen) and scores[1] == weights:
        _, _, score, last, sources = scores
        st.metric("selection (lower is better)", f"{score:.4f}", delta=f"{score - last:+.4f} vs last checkpoint",
                  delta_color="inverse")
        if sources is not None:
            evaluated, read = sources
            st.caption(f"Of the 2 scores: {evaluated} evaluated and written to the score store on disk, {read} read "
                       f"from it, {2 - evaluated - read} remembered from this session.")

refs = [run.checkpoint_at(s) for s in chosen]
default_out = default_merge_folder(run.path, recipe_method, chosen)
out_text = st.text_input("Output folder (must not exist)", value=str(default_out), key="out_dir")
dtype = st.selectbox("Output dtype", ["same", "float32", "bfloat16", "float16"], key="out_dtype")
with st.expander("Plan the merge first (what it reads and writes, memory, time)"):
    st.caption("The dry run: it writes nothing, checks the target, the inputs' keys and shapes and the free disk, "
               "and times a short read of the real inputs (as `merge --dry-run`).")
    plan_key = (tuple(chosen), weights, out_text, dtype)
    if st.button("Plan", key="plan_button"):
        try:
            with st.spinner("Probing the inputs' read speed..."):
                plan = plan_merge(refs, weights, resolve_within(out_text, state.root()), dtype)
            st.session_state["merge_plan"] = (plan_key, plan)
        except AnalysisError as e:
            st.error(str(e))
    saved = st.session_state.get("merge_plan")
    if saved and saved[0] == plan_key:
        plan = saved[1]
        cols = st.columns(4)
        cols[0].metric("reads", f"{plan.input_bytes / 1e9:,.2f} GB")
        cols[1].metric("writes", f"{plan.output_bytes / 1e9:,.2f} GB")
        cols[2].metric("peak memory", f"{plan.peak_memory_bytes / 1e6:,.0f} MB")
        cols[3].metric("time, inputs cached", f"{plan.projected_seconds:,.1f} s")
        uncached = plan.projection.uncached_seconds
        st.caption((f"From storage (the probe's first read was slower): about {uncached:,.1f} s. " if uncached else "")
                   + f"Free disk {plan.free_bytes / 1e9:,.2f} GB; probe {plan.probe_mb_per_s:,.0f} MB/s with the "
                   f"{ARITHMETIC[plan.arithmetic]}; writes {', '.join(plan.files)} into `{plan.out_dir}`"
                   + (" (replacing it)" if plan.replaces_existing else "") + ".")

job_id = state.job_id()
job = cached.jobs().get(job_id) if job_id else None
running = job is not None and not job.done.is_set()
if st.button("Merge", type="primary", key="merge_button", disabled=running):
    try:
        out_dir = resolve_within(out_text, state.root())
        recipe = cached.selection_recipe(now.path, now.stamp, tuple(chosen), tuple(weights), recipe_method, dtype, taken,
                                         settings)
        state.set_job_id(cached.start_merge(recipe, out_dir))
        running = True
    except AnalysisError as e:
        st.error(str(e))


@st.fragment(run_every=0.5 if running else None)
def merge_progress() -> None:
    """Poll the background merge; a loop in the page body would be killed by any click."""
    current = cached.jobs().get(state.job_id() or "")
    if current is None:
        return
    if not current.done.is_set():
        with st.status(f"Merging {current.total_steps} checkpoints into {current.out_dir}", state="running"):
            st.progress(current.fraction, text=current.message)
    elif running:
        st.rerun()  # once: re-enable the Merge button and stop polling
    elif current.error:
        st.error(current.error)
    elif current.result is not None:
        result = current.result
        st.success(f"Merged {len(result.steps)} checkpoint{'' if len(result.steps) == 1 else 's'} into `{result.model_file}` "
                   f"({result.size_bytes / 1e6:,.2f} MB, {result.n_tensors} tensors).")
        if result.stale.paths:
            st.caption(result.stale.describe().capitalize() + ".")
        for line in result.warnings:   # inputs holding NaN/Inf, averages that overflow (issue 19)
            st.warning(line)


merge_progress()

# The recipe the Merge button merges, byte for byte (issue 20): same cache entry, same dtype.
recipe_yaml, mergekit_yaml = cached.recipe_texts(now.path, now.stamp, tuple(chosen), tuple(weights), recipe_method,
                                                 dtype, taken, settings)
left, right = st.columns(2)
left.download_button("Download recipe (YAML)", recipe_yaml, file_name="recipe.yaml", mime="application/x-yaml",
                     on_click="ignore", key="dl_recipe")
right.download_button("Download mergekit config", mergekit_yaml, file_name="mergekit_config.yml",
                      mime="application/x-yaml", on_click="ignore", key="dl_mergekit")
st.caption("The same merge from the command line (save the recipe first):")
st.code(f"python -m analysis merge recipe.yaml -o {shlex.quote(out_text)}"
        + (f" --dtype {dtype}" if dtype != "same" else ""), language="bash")
