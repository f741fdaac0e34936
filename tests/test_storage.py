"""Storage arithmetic on hand-computed cases, keep policies, time, and parameter counts (issue 8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.cli import main
from analysis.errors import AnalysisError, InvalidArgument
from analysis.errors import ModelConfigError
from analysis.model_size import count_parameters
from analysis.run import open_run
from analysis.storage import KeepPolicy, count_kept, estimate_storage, measure_checkpoint_overhead

CONFIGS = Path(__file__).parent / "data" / "configs"


def test_7b_hand_computed() -> None:
    fp32 = estimate_storage(7e9, "fp32", "none", keep=1)
    assert fp32.weights_bytes == 28e9 and fp32.per_checkpoint_bytes == 28e9
    bf16 = estimate_storage(7e9, "bf16", "adamw", keep=10, bandwidth_gbps=2.0)
    assert bf16.weights_bytes == 14e9
    assert bf16.optimizer_bytes == 84e9          # fp32 master + two fp32 moments = 12 B/param
    assert bf16.master_bytes == 28e9
    assert bf16.total_bytes == 10 * 98e9
    assert bf16.write_seconds == pytest.approx(49.0)
    assert bf16.monthly_cost == pytest.approx(0.98 * 23.0)
    assert bf16.chinchilla_tokens == 140e9
    # The two numbers the articles quote: 56 GB is 8 B/param, 28 GB is fp32 weights (4 B), not "16 bits".
    assert estimate_storage(7e9, "fp32", "adamw", keep=1).optimizer_bytes == 56e9   # fp32 training: no master copy
    assert estimate_storage(7e9, "fp16", "none").weights_bytes == 14e9


@pytest.mark.parametrize(("dtype", "optimizer", "per_param"), [
    ("bf16", "sgd", 2 + 4 + 4), ("fp32", "sgd", 4 + 4), ("fp8", "adamw", 1 + 12), ("int4", "none", 0.5),
    ("fp32", "none", 4), ("bf16", "adam", 14),
])
def test_bytes_per_param_table(dtype: str, optimizer: str, per_param: float) -> None:
    assert estimate_storage(1e9, dtype, optimizer).per_checkpoint_bytes == pytest.approx(per_param * 1e9)


def test_ema_and_weights_only_side_by_side() -> None:
    est = estimate_storage(7e9, "bf16", "adamw", keep=2, ema=True)
    assert est.ema_bytes == 28e9 and est.per_checkpoint_bytes == 126e9
    assert est.weights_only_bytes == 42e9   # weights + EMA, no optimizer state
    assert any("12 B" in line and "84.00 GB" in line for line in est.arithmetic)


def test_adafactor_factored_moments_from_config_shapes() -> None:
    count = count_parameters(CONFIGS / "llama-2-7b.json")
    est = estimate_storage(count.total, "bf16", "adafactor", factored_elements=count.factored_elements)
    # fp32 master (4 B) + rows+cols per matrix: a few MB, nowhere near Adam's 8 B/param.
    assert est.optimizer_bytes == pytest.approx(4 * count.total + 4 * count.factored_elements)
    assert 0 < est.optimizer_bytes - 4 * count.total < 0.01 * count.total
    guess = estimate_storage(count.total, "bf16", "adafactor")   # from the count alone
    assert guess.optimizer_bytes == pytest.approx(est.optimizer_bytes, rel=1e-3)


def test_overhead_fraction_of_synchronous_saves() -> None:
    est = estimate_storage(1e9, "bf16", "none", keep=5, bandwidth_gbps=1.0, step_time_s=1.0, every_steps=98)
    assert est.write_seconds == pytest.approx(2.0)
    assert est.overhead_fraction == pytest.approx(2.0 / 100.0)
    assert estimate_storage(1e9).overhead_fraction is None


def test_asynchronous_saves_stall_only_for_the_snapshot_unless_writes_back_up() -> None:
    # 98 GB full state; write 49 s at 2 GB/s; snapshot 98/25 = 3.92 s.
    est = estimate_storage(7e9, step_time_s=1.0, every_steps=100, asynchronous=True)
    assert est.stall_seconds == pytest.approx(3.92)
    assert est.overhead_fraction == pytest.approx(3.92 / 103.92)
    backed_up = estimate_storage(7e9, step_time_s=1.0, every_steps=40, asynchronous=True)
    assert backed_up.stall_seconds == pytest.approx(3.92 + 9.0)   # 49 s write, 40 s between saves


def test_window_bytes_from_the_recommendation_size() -> None:
    est = estimate_storage(7e9, keep=3, window=5)
    assert est.window_bytes == 5 * 14e9


def test_policy_last_capped_by_saves_and_full_state_split() -> None:
    est = estimate_storage(7e9, policy=KeepPolicy(kind="last", last=50, total_steps=10_000, full_state_last=2),
                           every_steps=1000)
    assert est.kept == 10 and est.kept_full == 2
    assert est.total_bytes == 2 * 98e9 + 8 * 14e9


def test_policy_every_hand_counted() -> None:
    # Saves every 1000 steps to 20000; keep multiples of 5000 (4) + newest 3 (18k, 19k, 20k): 20k twice.
    kept = count_kept(KeepPolicy(kind="every", last=3, keep_every_steps=5000, total_steps=20_000), 1000, 1.0, 1.0)
    assert kept.total == 6


@settings(max_examples=60, deadline=None)
@given(every=st.integers(1, 50), keep_every=st.integers(1, 200), total=st.integers(1, 2000), last=st.integers(0, 30))
def test_policy_every_matches_enumeration(every: int, keep_every: int, total: int, last: int) -> None:
    saves = list(range(every, total + 1, every))
    if not saves:
        return
    expected = len({s for s in saves if s % keep_every == 0} | set(saves[len(saves) - min(last, len(saves)):]))
    policy = KeepPolicy(kind="every", last=last, keep_every_steps=keep_every, total_steps=total)
    assert count_kept(policy, every, 1.0, 1.0).total == expected


def test_policy_topk_and_budget() -> None:
    assert estimate_storage(7e9, policy=KeepPolicy(kind="topk", top_k=5)).kept == 6
    fit = estimate_storage(7e9, policy=KeepPolicy(kind="budget", budget_bytes=1e12))
    assert fit.kept == 10 and fit.total_bytes == 980e9            # 1 TB / 98 GB
    mixed = estimate_storage(7e9, policy=KeepPolicy(kind="budget", budget_bytes=1e12, full_state_last=2))
    assert (mixed.kept_full, mixed.kept) == (2, 2 + int((1e12 - 196e9) // 14e9))
    assert mixed.total_bytes <= 1e12


def test_bad_arguments() -> None:
    with pytest.raises(InvalidArgument, match="dtype"):
        estimate_storage(1e9, "fp13")
    with pytest.raises(InvalidArgument, match="optimizer"):
        estimate_storage(1e9, "bf16", "lion")
    with pytest.raises(InvalidArgument, match="positive"):
        estimate_storage(0)
    with pytest.raises(InvalidArgument, match="every policy needs"):
        estimate_storage(1e9, policy=KeepPolicy(kind="every", keep_every_steps=10))
    with pytest.raises(InvalidArgument, match="policy must be"):
        estimate_storage(1e9, policy=KeepPolicy(kind="newest"))
    with pytest.raises(InvalidArgument, match="budget"):
        estimate_storage(1e9, policy=KeepPolicy(kind="budget"))


def test_measured_overhead_from_step_times(tmp_path: Path) -> None:
    from conftest import rewrite_metrics, write_tiny_run

    root = write_tiny_run(tmp_path / "run", [100, 200, 300])
    slow = {101, 201}   # the step after each save (none after the last, at 300)
    rewrite_metrics(root, lambda r: {**r, "step_time_ms": 3000.0 if r["step"] in slow else 500.0}
                    if "train_loss" in r else r)
    measured = measure_checkpoint_overhead(open_run(root))
    assert measured is not None and measured.saves_seen == 2   # the save at the last step shows nothing
    assert measured.median_step_seconds == pytest.approx(0.5)
    assert measured.stall_seconds == pytest.approx(2.5)
    assert measured.overhead_fraction == pytest.approx(2.5 / (100 * 0.5 + 2.5))
    assert measure_checkpoint_overhead(open_run(write_tiny_run(tmp_path / "plain", [50, 100]))) is None


# --- parameter counts -------------------------------------------------------------------------

def _tiny_configs():
    import transformers as tf

    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000)
    return {
        "llama": tf.LlamaConfig(**base), "llama-attention-bias": tf.LlamaConfig(**base, attention_bias=True),
        "llama-tied": tf.LlamaConfig(**base, tie_word_embeddings=True), "mistral": tf.MistralConfig(**base),
        "qwen2": tf.Qwen2Config(**base), "qwen3": tf.Qwen3Config(**base, head_dim=32),
        "gemma": tf.GemmaConfig(**base, head_dim=32), "gemma2": tf.Gemma2Config(**base, head_dim=32),
        "mixtral": tf.MixtralConfig(**base, num_local_experts=4, num_experts_per_tok=2),
        "gpt2": tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=1000,
                              bos_token_id=0, eos_token_id=0),
        "gpt-neox": tf.GPTNeoXConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=1000, bos_token_id=0, eos_token_id=0),
    }


@pytest.mark.parametrize("family", list(_tiny_configs()))
def test_count_matches_a_model_built_by_transformers(family: str, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    cfg = _tiny_configs()[family]
    torch.manual_seed(0)
    real = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    assert count_parameters(tmp_path).total == real           # the folder, read from disk


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.stem)
def test_count_matches_published_sizes(path: Path) -> None:
    published = json.loads(path.read_text())
    count = count_parameters(path)
    assert count.total == pytest.approx(published["_published_params"], rel=0.01)
    if "_published_active_params" in published:
        assert count.active == pytest.approx(published["_published_active_params"], rel=0.01)


def test_tied_embeddings_and_mixture_of_experts() -> None:
    assert count_parameters(CONFIGS / "gpt2.json").tied_embeddings
    assert count_parameters(CONFIGS / "gemma-7b.json").tied_embeddings
    mixtral = count_parameters(CONFIGS / "mixtral-8x7b.json")
    assert not mixtral.tied_embeddings and 3.5 < mixtral.total / mixtral.active < 3.7   # 46.7B of which 12.9B active


def test_config_missing_a_field_names_file_and_field(tmp_path: Path) -> None:
    cfg = json.loads((CONFIGS / "llama-3-8b.json").read_text())
    del cfg["intermediate_size"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match=r"config\.json: missing field 'intermediate_size'") as err:
        count_parameters(path)
    assert isinstance(err.value, AnalysisError)
    path.write_text(json.dumps({**cfg, "model_type": "qwen2_moe"}))
    with pytest.raises(ModelConfigError, match="'qwen2_moe' is not one CkptSelect can count"):
        count_parameters(path)
    with pytest.raises(ModelConfigError, match="no such file"):
        count_parameters(tmp_path / "nope.json")


# --- command line ----------------------------------------------------------------------------

def test_storage_cli_from_config_with_policy(capsys: pytest.CaptureFixture) -> None:
    args = ["storage", "--config", str(CONFIGS / "llama-2-7b.json"), "--policy", "every", "--keep", "3",
            "--keep-every", "5000", "--every", "1000", "--total-steps", "20000", "--step-time-s", "1.5",
            "--async", "--json"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    for key in ("params", "per_checkpoint_bytes", "kept", "total_bytes", "monthly_cost", "write_seconds",
                "overhead_fraction", "chinchilla_tokens"):
        assert key in doc
    assert doc["params"] == 6738415616 and doc["kept"] == 6 and doc["asynchronous"] is True
    assert doc["per_checkpoint_bytes"]["weights"] == 2 * 6738415616
    assert doc["weights_only_bytes"] == 2 * 6738415616 and doc["master_copy_bytes"] == 4 * 6738415616
    assert doc["model"]["model_type"] == "llama" and doc["arithmetic"]


def test_storage_cli_with_a_run_takes_the_window(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    # --dtype given: without it the run's own dtype (fp32 here) is used (issue 20, tests/test_front_ends.py)
    assert main(["storage", "--params", "1e6", "--dtype", "bf16", "--run", str(tiny_run), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["window"] >= 1 and doc["window_bytes"] == doc["window"] * 2e6
    assert doc["measured"] is None      # the tiny run logs no step times


def test_storage_cli_bad_input_exits_2(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert main(["storage", "--json"]) == 2
    assert "--params" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{\"model_type\": \"llama\"}")
    assert main(["storage", "--config", str(tmp_path / "config.json")]) == 2
    assert "missing field 'hidden_size'" in capsys.readouterr().err
