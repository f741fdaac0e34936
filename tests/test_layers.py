"""Issue 25: per-layer statistics, flags on planted cases, exclusion, pre/post-norm, CLI and report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from analysis.cli import main
from analysis.run import open_run
from analysis.selection import RecommendConfig, recommend
from analysis.signals import assess_run, sketch_checkpoint, tensor_role
from analysis.signals.layer_report import layer_heatmap, norm_placement
from analysis.signals.layers import LayerTracker
from ckpt_factories import dcp_checkpoint, hf_checkpoint

STEPS = list(range(100, 1500, 100))   # 14 checkpoints
D, VOCAB = 16, 32


def gpt2_state(gen: torch.Generator, n_layer: int = 4) -> dict[str, torch.Tensor]:
    """A GPT-2 state dict (Hugging Face names, Conv1D shapes) of width 16."""
    r = lambda *shape: 0.02 * torch.randn(*shape, generator=gen)   # noqa: E731
    sd = {"transformer.wte.weight": r(VOCAB, D), "transformer.wpe.weight": r(8, D)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        sd.update({p + "ln_1.weight": 1 + r(D), p + "ln_1.bias": r(D), p + "attn.c_attn.weight": r(D, 3 * D),
                   p + "attn.c_attn.bias": r(3 * D), p + "attn.c_proj.weight": r(D, D), p + "attn.c_proj.bias": r(D),
                   p + "ln_2.weight": 1 + r(D), p + "ln_2.bias": r(D), p + "mlp.c_fc.weight": r(D, 4 * D),
                   p + "mlp.c_fc.bias": r(4 * D), p + "mlp.c_proj.weight": r(4 * D, D), p + "mlp.c_proj.bias": r(D)})
    sd.update({"transformer.ln_f.weight": 1 + r(D), "transformer.ln_f.bias": r(D)})
    return sd


def llama_state(gen: torch.Generator, n_layer: int = 4) -> dict[str, torch.Tensor]:
    """A Llama state dict (Hugging Face names) of width 16."""
    r = lambda *shape: 0.02 * torch.randn(*shape, generator=gen)   # noqa: E731
    sd = {"model.embed_tokens.weight": r(VOCAB, D), "lm_head.weight": r(VOCAB, D), "model.norm.weight": 1 + r(D)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        sd.update({p + f"self_attn.{x}_proj.weight": r(D, D) for x in "qkvo"})
        sd.update({p + "mlp.gate_proj.weight": r(2 * D, D), p + "mlp.up_proj.weight": r(2 * D, D),
                   p + "mlp.down_proj.weight": r(D, 2 * D), p + "input_layernorm.weight": 1 + r(D),
                   p + "post_attention_layernorm.weight": 1 + r(D)})
    return sd


def planted_run(root: Path, make_state, plant=None) -> tuple[Path, list[dict[str, torch.Tensor]]]:
    """Checkpoints drifting by 1% of each tensor's RMS per save, with ``plant(index, state)`` applied after the
    drift at each index; a flat logged loss (no loss spike) with val at each save. Returns the states saved."""
    gen = torch.Generator().manual_seed(0)
    state = make_state(gen)
    saved = []
    (root / "ckpt").mkdir(parents=True)
    for index, step in enumerate(STEPS):
        state = {k: v + 0.01 * v.pow(2).mean().sqrt() * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        if plant is not None:
            state = plant(index, state)
        saved.append({k: v.clone() for k, v in state.items()})
        save_file(state, str(root / "ckpt" / f"step_{step:06d}.safetensors"))
    rows = [{"step": s, "train_loss": 2.0 + 0.01 * math.sin(s), "lr": 1e-3} for s in range(1, STEPS[-1] + 1)]
    rows += [{"step": s, "val_loss": 2.0 + 0.001 * math.cos(s)} for s in STEPS]
    (root / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, saved


def grow(layer_prefix: str, from_index: int, rate: float = 1.03):
    """Plant: the tensors under ``layer_prefix`` grow by ``rate`` per checkpoint from ``from_index`` on."""
    def plant(index: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if index < from_index:
            return state
        return {k: v * rate if k.startswith(layer_prefix) else v for k, v in state.items()}
    return plant


def kick(layer_prefix: str, at_index: int, size: float = 0.2):
    """Plant: one update of ``size`` times each tensor's RMS on the tensors under ``layer_prefix``, kept after."""
    gen = torch.Generator().manual_seed(99)

    def plant(index: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if index != at_index:
            return state
        return {k: v + size * v.pow(2).mean().sqrt() * torch.randn(v.shape, generator=gen)
                if k.startswith(layer_prefix) else v for k, v in state.items()}
    return plant


def flagged(signals) -> set[tuple[str, int]]:
    return {(f.layer, f.start_step) for f in signals.layers.flags}


def test_tensor_roles_from_hf_nanogpt_megatron_torchtitan_deepspeed_names() -> None:
    cases = {
        "transformer.h.3.attn.c_attn.weight": ("transformer.h.3 attn", "qkv"),
        "transformer.h.3.mlp.c_proj.weight": ("transformer.h.3 mlp", "mlp"),
        "transformer.ln_f.weight": ("final norm", "norm"),
        "model.layers.1.self_attn.k_proj.weight": ("model.layers.1 attn", "k"),
        "model.layers.1.post_attention_layernorm.weight": ("model.layers.1 norm", "norm"),
        "language_model.encoder.layers.4.self_attention.query_key_value.weight":
            ("language_model.encoder.layers.4 attn", "qkv"),
        "language_model.encoder.layers.4.mlp.dense_4h_to_h.weight": ("language_model.encoder.layers.4 mlp", "mlp"),
        "layers.2.attention.wq.weight": ("layers.2 attn", "q"),
        "layers.2.feed_forward.w1.weight": ("layers.2 mlp", "mlp"),
        "output.weight": ("head", "head"),
        "tok_embeddings.weight": ("embedding", "embedding"),
        "module.model.layers.0.self_attn.o_proj.weight": ("module.model.layers.0 attn", "o"),
    }
    assert {name: (tensor_role(name).layer, tensor_role(name).role) for name in cases} == cases


def test_growing_layer_is_flagged_at_its_onset_and_nothing_else(tmp_path: Path) -> None:
    """Issue 25: a layer made to grow 3% per checkpoint from step 600 is the only flag, from step 600."""
    run, _ = planted_run(tmp_path / "r", gpt2_state, grow("transformer.h.2.mlp.", 5))
    signals = assess_run(open_run(run))
    assert flagged(signals) == {("transformer.h.2 mlp", 600)}
    assert {f.kind for f in signals.layers.flags} <= {"growth_rms", "growth_max_abs"}
    assert "growth_rms" in {f.kind for f in signals.layers.flags}
    assert all(c.abnormal is None for c in signals.checkpoints)   # a trend is reported, not excluded


def test_one_large_update_is_flagged_at_its_step_and_excluded_with_its_reason(tmp_path: Path) -> None:
    """Issue 25: one update 20x the usual on model.layers.1's attention at step 800: flagged there, only there,
    and that checkpoint is left out of the recommendation with the flag's reason."""
    run, _ = planted_run(tmp_path / "r", llama_state, kick("model.layers.1.self_attn.", 7))
    signals = assess_run(open_run(run))
    assert [(f.kind, f.layer, f.previous_step, f.start_step, f.end_step) for f in signals.layers.flags] == [
        ("update_jump", "model.layers.1 attn", 700, 800, 800)]
    assert [c.ref.step for c in signals.checkpoints if c.abnormal] == [800]
    assert "spike in weight space" in signals.at(800).abnormal
    rec = recommend(signals, RecommendConfig(window=10))
    assert 800 not in [r.step for r in rec.checkpoints]
    assert "abnormal state" in rec.reasons["800"] and "model.layers.1 attn" in rec.reasons["800"]
    forced = recommend(signals, RecommendConfig(window=10, include_contaminated=True))
    assert 800 in [r.step for r in forced.checkpoints]


def test_max_abs_outlier_is_flagged_and_recovery_cuts_before_it(tmp_path: Path) -> None:
    """Issue 25: one weight of transformer.h.1's attention set to 8x the layer's max at step 1000 (and kept):
    every flag names that layer from step 1000; a recovery without a loss spike cuts there."""
    def plant(index: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if index == 9:
            name = "transformer.h.1.attn.c_proj.weight"
            state[name][0, 0] = 8 * float(state[name].abs().max())
        return state
    run, _ = planted_run(tmp_path / "r", gpt2_state, plant)
    signals = assess_run(open_run(run))
    assert flagged(signals) == {("transformer.h.1 attn", 1000)}
    assert "max_abs" in {f.kind for f in signals.layers.flags}
    assert signals.at(1000).abnormal is not None and signals.at(900).abnormal is None
    rec = recommend(signals, RecommendConfig(method="recovery"))
    assert max(r.step for r in rec.checkpoints) < 1000
    assert "abnormal" in rec.reasons["1000"]


def test_calm_run_has_no_flags(tmp_path: Path) -> None:
    run, _ = planted_run(tmp_path / "r", gpt2_state)
    signals = assess_run(open_run(run))
    assert signals.layers.flags == () and all(c.abnormal is None for c in signals.checkpoints)


def test_statistics_match_an_independent_torch_computation(tmp_path: Path) -> None:
    """RMS, max |w|, q·k product exact; relative update and cosine exact while every tensor fits the sketch."""
    run, saved = planted_run(tmp_path / "r", gpt2_state)
    report = assess_run(open_run(run)).layers
    names = [k for k in saved[0] if k.startswith("transformer.h.2.attn.")]
    flat = [torch.cat([s[k].double().reshape(-1) for k in names]) for s in saved]
    layer = report.layer("transformer.h.2 attn")
    assert report.exact and layer.exact
    for i in range(len(STEPS)):
        assert layer.rms[i] == pytest.approx(float(flat[i].pow(2).mean().sqrt()), rel=1e-12)
        assert layer.max_abs[i] == float(flat[i].abs().max())
        q, k, _ = saved[i]["transformer.h.2.attn.c_attn.weight"].double().chunk(3, 1)
        assert layer.qk_norm_product[i] == pytest.approx(float(q.norm() * k.norm()), rel=1e-12)
    for i in range(2, len(STEPS)):
        delta, before = flat[i] - flat[i - 1], flat[i - 1] - flat[i - 2]
        assert layer.relative_update[i] == pytest.approx(float(delta.norm() / flat[i - 1].norm()), rel=1e-9)
        assert layer.update_cosine[i] == pytest.approx(float(delta @ before / (delta.norm() * before.norm())),
                                                       abs=1e-9)
    assert math.isnan(layer.relative_update[0]) and math.isnan(layer.update_cosine[1])


def test_sketched_relative_update_is_within_its_stated_error(tmp_path: Path) -> None:
    """With 64 buckets the 1024-element MLP weights are sketched: the estimate stays within 4 stated errors."""
    run, saved = planted_run(tmp_path / "r", gpt2_state)
    tracker = LayerTracker()
    for ref in open_run(run).checkpoints:
        tracker.add(sketch_checkpoint(ref, buckets=64, use_cache=False))
    layer = next(s for s in tracker.series() if s.name == "transformer.h.0 mlp")
    assert not layer.exact and layer.sketch_buckets == 64
    error = math.sqrt(1 / (2 * 64))
    names = [k for k in saved[0] if k.startswith("transformer.h.0.mlp.")]
    flat = [torch.cat([s[k].double().reshape(-1) for k in names]) for s in saved]
    for i in range(1, len(STEPS)):
        exact = float((flat[i] - flat[i - 1]).norm() / flat[i - 1].norm())
        assert abs(layer.relative_update[i] / exact - 1) < 4 * error


def test_pre_and_post_norm_from_config_or_key_layout(tmp_path: Path) -> None:
    (tmp_path / "post").mkdir()
    (tmp_path / "post" / "config.json").write_text(json.dumps({"model": {"norm": "post"}}))
    assert norm_placement([tmp_path / "post"], []).kind == "post-norm"
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert norm_placement([tmp_path / "bert"], []).kind == "post-norm"
    gpt2 = list(gpt2_state(torch.Generator().manual_seed(0)))
    assert norm_placement([tmp_path / "none"], gpt2).kind == "pre-norm"
    bert_keys = ["bert.encoder.layer.0.attention.self.query.weight",
                 "bert.encoder.layer.0.attention.output.LayerNorm.weight", "bert.encoder.layer.0.output.LayerNorm.weight"]
    assert norm_placement([tmp_path / "none"], bert_keys).kind == "post-norm"
    assert norm_placement([tmp_path / "none"], ["a.weight"]).kind == "unknown"


def _analyze_layers(path: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["analyze", str(path), "--layers", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["layers"]


def test_analyze_layers_json_on_the_sample_run(sample_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _analyze_layers(sample_run, capsys)
    assert doc["norm_placement"]["kind"] == "pre-norm" and len(doc["steps"]) == 24
    names = [layer["name"] for layer in doc["layers"]]
    assert names[0] == "embedding" and "transformer.h.1 attn" in names and names[-1] == "final norm"
    assert all(len(layer["rms"]) == 24 and layer["relative_update"][0] is None for layer in doc["layers"])
    attn = next(layer for layer in doc["layers"] if layer["name"] == "transformer.h.0 attn")
    assert all(v > 0 for v in attn["qk_norm_product"])
    assert [lead["first_hit_step"] for lead in doc["spike_leads"]][:1] == [2400]   # the LR excursion at 2395
    assert main(["analyze", str(sample_run), "--layers"]) == 0
    text = capsys.readouterr().out
    assert "layers: pre-norm" in text and "transformer.h.1 mlp" in text


def test_analyze_layers_json_on_hf_and_dcp_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for step, seed in ((100, 0), (200, 1), (300, 2)):
        hf_checkpoint(tmp_path / "hf" / f"checkpoint-{step}", step, seed=seed)
        dcp_checkpoint(tmp_path / "dcp" / f"step-{step}", seed=seed, step=step)
    doc = _analyze_layers(tmp_path / "hf", capsys)
    assert doc["steps"] == [100, 200, 300] and doc["norm_placement"]["kind"] == "pre-norm"
    assert '"model_type": "llama"' in doc["norm_placement"]["evidence"]
    attn = next(layer for layer in doc["layers"] if layer["name"] == "model.layers.1 attn")
    assert sorted(attn["tensors"]) == sorted(f"model.layers.1.self_attn.{x}_proj.weight" for x in "qkvo")
    assert attn["qk_norm_product"][0] > 0 and attn["relative_update"][1] > 0
    doc = _analyze_layers(tmp_path / "dcp", capsys)
    assert doc["steps"] == [100, 200, 300]
    assert {layer["name"] for layer in doc["layers"]} >= {"embedding", "h.0 mlp", "h.1 norm", "head"}


def test_analyze_layers_json_on_a_deepspeed_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 25's done-when names DeepSpeed runs too: weights under ``module`` in ``global_stepN/`` folders."""
    from test_field_layouts import write_deepspeed_run
    written = write_deepspeed_run(tmp_path / "ds")
    doc = _analyze_layers(tmp_path / "ds", capsys)
    assert doc["steps"] == [10, 20, 30]
    names = {layer["name"] for layer in doc["layers"]}
    assert {"embedding", "h.0 mlp", "h.1 norm", "head"} <= names, names
    head = next(layer for layer in doc["layers"] if layer["name"] == "head")
    weight = written[30]["module"]["lm_head.weight"].float()
    assert head["rms"][-1] == pytest.approx(float(weight.square().mean().sqrt()), rel=1e-6)
    assert head["max_abs"][-1] == pytest.approx(float(weight.abs().max()), rel=1e-6)


def test_heatmap_grid_and_flagged_cells(tmp_path: Path) -> None:
    run, _ = planted_run(tmp_path / "r", llama_state, kick("model.layers.1.self_attn.", 7))
    report = assess_run(open_run(run)).layers
    grid = layer_heatmap(report, "rms_growth")
    assert len(grid.values) == len(grid.layers) == len(report.layers) and all(len(r) == 14 for r in grid.values)
    assert ("model.layers.1 attn", 800) in layer_heatmap(report).flagged


def test_layers_view_draws_the_heatmap_and_a_chosen_layers_curves(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 25: the Layers page draws layers × checkpoints cells, names the flag, and shows a layer's curves."""
    from streamlit.testing.v1 import AppTest

    import charts
    from conftest import REPO

    run, _ = planted_run(tmp_path / "r", llama_state, kick("model.layers.1.self_attn.", 7))
    monkeypatch.setenv("CKPT_SELECT_RUN", str(run))
    monkeypatch.setenv("CKPT_SELECT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("CKPT_SELECT_ROOT", raising=False)
    at = AppTest.from_file(str(REPO / "app" / "streamlit_app.py"), default_timeout=120)
    at.run()
    at.switch_page("views/layers.py").run()
    assert not at.exception, at.exception
    heatmap, curves = (json.loads(c.proto.spec) for c in at.get("plotly_chart"))
    cells = heatmap["data"][0]
    assert cells["type"] == "heatmap" and len(cells["y"]) == 4 * 3 + 3 and len(cells["x"]) == len(STEPS)
    assert len(cells["z"]) == len(cells["y"]) and all(len(row) == len(STEPS) for row in cells["z"])
    assert any("model.layers.1 attn" in w.value and "Left out of averages" in w.value for w in at.warning)
    assert curves["layout"]["title"]["text"] == "model.layers.1 attn"   # the flagged layer first
    at.session_state["layers_chosen"] = "model.layers.2 mlp"
    at.run()
    assert json.loads(at.get("plotly_chart")[1].proto.spec)["layout"]["title"]["text"] == "model.layers.2 mlp"
    selection = {"points": [{"x": "800", "y": "model.layers.0 norm"}]}
    assert charts.layer_from_selection(selection, tuple(cells["y"])) == "model.layers.0 norm"
    assert charts.layer_from_selection({"points": []}, tuple(cells["y"])) is None
