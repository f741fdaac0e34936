"""Log readers (ISSUE 3): golden excerpts, every real log, restarts, NaN, bad input, timing.

Real logs are read from CKPT_SELECT_REAL_LOGS if set, else ``<repo>/../shared/real_logs``
(a worktree or a CI clone has ../shared beside it); those tests skip when it is absent.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis.cli import main as cli_main
from analysis.errors import LogParseError, UnknownLogFormat
from analysis.logs import LOG_READERS, read_log, sniff_format
from analysis.logs.base import LogTable
from analysis.report import log_report
from analysis.run import open_run
from analysis.signals.timing import analyze_step_times

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "logs"
REAL_LOGS = Path(os.environ.get("CKPT_SELECT_REAL_LOGS", REPO.parent / "shared" / "real_logs"))
needs_real_logs = pytest.mark.skipif(not REAL_LOGS.is_dir(), reason=f"real logs not found at {REAL_LOGS} "
                                     "(set CKPT_SELECT_REAL_LOGS or put shared/real_logs beside the repo)")


# --- golden excerpts ---------------------------------------------------------------------
def _golden_cases() -> list[Path]:
    return sorted(p for p in GOLDEN.glob("*/*") if not p.name.endswith(".expected.csv"))


def _normalised(table: LogTable) -> str:
    """The tidy output as text: a summary line, then step,metric,value,wall_time sorted."""
    frame = table.frame.sort_values(["metric", "step"], kind="stable")
    out = io.StringIO()
    out.write(f"# format={table.format} rows={table.rows} skipped_lines={table.skipped_lines} "
              f"restarts={table.restarts}\n")
    frame.to_csv(out, index=False, float_format="%.10g", lineterminator="\n")
    return out.getvalue()


@pytest.mark.parametrize("case", _golden_cases(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_golden(case: Path, update_golden: bool) -> None:
    """Each excerpt is sniffed as its folder's reader and reads to the stored tidy frame."""
    assert sniff_format(case) == case.parent.name
    actual = _normalised(read_log(case))
    expected_path = case.with_name(case.name + ".expected.csv")
    if update_golden:
        expected_path.write_text(actual)
    assert expected_path.exists(), f"no {expected_path.name}: run pytest --update-golden and review the diff"
    assert actual == expected_path.read_text()


def test_every_reader_has_a_golden_case() -> None:
    assert {p.parent.name for p in _golden_cases()} == set(LOG_READERS)


# --- every real log --------------------------------------------------------------------
# (file, format, rows, skipped_lines, restarts, {metric: (count, first_step, last_step, last)}).
# Counts and last values checked by eye against the files (tails, grep) and MANIFEST.md.
REAL = [
    ("generic_csv_jsonl/AndyZhao_cs336_metrics_list.json", "json_records", 172, 0, 0, {'lr': (40, 0, 1950, 3.046109344409957e-05), 'train_loss': (40, 0, 1950, 1.0280201435089111), 'val_loss': (10, 200, 2000, 1.0403826719522475)}),
    ("generic_csv_jsonl/AndyZhao_cs336_wandb_style_sparse_metrics.csv", "csv", 172, 0, 0, {'lr': (40, 0, 1950, 3.046109344409957e-05), 'train_loss': (40, 0, 1950, 1.0280201435089111), 'val_loss': (10, 200, 2000, 1.0403826719522475)}),
    ("generic_csv_jsonl/NSLLM_llamafactory_trainer_log.jsonl", "jsonl", 436, 0, 0, {'lr': (435, 5, 2175, 4.611130619530668e-10), 'train_loss': (435, 5, 2175, 1.9787)}),
    ("generic_csv_jsonl/duanjunwen_OpenSora_single_column_loss_curve.csv", "csv", 620, 0, 0, {'train_loss': (620, 0, 619, 0.10696428269147873)}),
    ("generic_csv_jsonl/fyh2001_swift_gemma4_full_epoch_logging.jsonl", "jsonl", 2354, 1, 0, {'grad_norm': (2353, 1, 2353, 8.5625), 'lr': (2353, 1, 2353, 0.0), 'train_loss': (2353, 1, 2353, 1.25756836)}),
    ("generic_csv_jsonl/luojiu7b_llamafactory_trainer_log.jsonl", "jsonl", 1743, 0, 0, {'lr': (1742, 5, 8710, 2.60072200469752e-11), 'train_loss': (1742, 5, 8710, 1.3703)}),
    ("generic_csv_jsonl/ruapotato_chat_hamner_pretrain_v4_base_metrics.csv", "csv", 2223, 0, 1, {'lr': (2013, 50, 100650, 0.0002), 'tokens': (2013, 50, 100650, 2473574400.0), 'train_loss': (2013, 50, 100650, 3.39736), 'val_loss': (201, 500, 100500, 3.312287)}),
    ("hf_trainer_state/Fujump_qlora_10k_trainer_state.json", "hf_trainer_state", 1001, 0, 0, {'lr': (1000, 10, 10000, 0.0002), 'train_loss': (1000, 10, 10000, 0.0886)}),
    ("hf_trainer_state/Jaong_CPT_rouge_trainer_state.json", "hf_trainer_state", 31, 0, 0, {'grad_norm': (10, 500, 5000, 3.681400775909424), 'lr': (10, 500, 5000, 1.7850637522768672e-06), 'train_loss': (10, 500, 5000, 0.2645), 'val_loss': (10, 549, 5490, 0.4916660189628601)}),
    ("hf_trainer_state/NSLLM_trainer_state.json", "hf_trainer_state", 436, 0, 0, {'grad_norm': (435, 5, 2175, 0.10451847314834595), 'lr': (435, 5, 2175, 4.611130619530668e-10), 'train_loss': (435, 5, 2175, 1.9787)}),
    ("hf_trainer_state/SeanGormann_dpo_ckpt1000_partial_trainer_state.json", "hf_trainer_state", 20, 0, 0, {'grad_norm': (20, 50, 1000, 0.9938778281211853), 'lr': (20, 50, 1000, 1.5720914973926764e-07), 'train_loss': (20, 50, 1000, 0.1138)}),
    ("hf_trainer_state/Silver8ce_llama_dpo_with_eval_trainer_state.json", "hf_trainer_state", 321, 0, 0, {'lr': (291, 1, 2900, 1.3379204892966359e-09), 'train_loss': (291, 1, 2900, 0.3322), 'val_loss': (29, 100, 2900, 0.5141671299934387)}),
    ("hf_trainer_state/aigoncharov_multi_evalset_trainer_state.json", "hf_trainer_state", 216, 0, 0, {'grad_norm': (30, 401, 12030, 1.7071932554244995), 'lr': (30, 401, 12030, 1e-05), 'train_loss': (30, 401, 12030, 0.0549)}),
    ("hf_trainer_state/chandlerzuo_orpo_trainer_state.json", "hf_trainer_state", 34, 0, 0, {'grad_norm': (33, 10, 330, 4.451015949249268), 'lr': (33, 10, 330, 4.868076312512515e-09), 'train_loss': (33, 10, 330, 0.1345)}),
    ("hf_trainer_state/luojiu7b_cpt_trainer_state.json", "hf_trainer_state", 1743, 0, 0, {'lr': (1742, 5, 8710, 2.60072200469752e-11), 'train_loss': (1742, 5, 8710, 1.3703)}),
    ("hf_trainer_stdout/fyh2001_swift_gemma4_full_epoch_stdout.log", "hf_stdout", 2354, 0, 0, {'grad_norm': (2353, 1, 2353, 8.562), 'lr': (2353, 1, 2353, 0.0), 'train_loss': (2353, 1, 2353, 1.258)}),
    ("lightning_csv/0Xero7_slm_v0_metrics.csv", "lightning_csv", 2834, 0, 0, {'train_loss': (2814, 49, 140699, 3.565943479537964), 'val_loss': (10, 14073, 140739, 3.570486068725586)}),
    ("lightning_csv/Melissasssss_TurnGPT_v0_epoch_loss_step.csv", "lightning_csv", 50, 0, 0, {'train_loss': (50, 49, 2499, 2.243922710418701)}),
    ("llmc/modded_2024-06-06_AdamW_llmc_baseline.log", "llmc", 9612, 0, 0, {'train_loss': (9536, 0, 9535, 3.34018), 'val_loss': (76, 0, 9536, 3.275959)}),
    ("llmc/modded_2024-10-13_llmc_main.log", "llmc", 19640, 0, 0, {'grad_norm': (19560, 0, 19559, 0.22), 'lr': (19560, 0, 19559, 0.0), 'train_loss': (19560, 0, 19559, 3.2217), 'val_loss': (80, 0, 19560, 3.2722)}),
    ("llmc/modded_2025-01-18_gpt2medium_llmc_main.log", "llmc", 241, 0, 0, {'val_loss': (241, 0, 60000, 2.9282)}),
    ("megatron_nemo_etc/NVIDIA_MegatronLM_dsv3_proxy_golden_values_47k_steps.json", "megatron_golden", 9537, 0, 0, {'step_time_ms': (9537, 1, 47680, 17113.19), 'train_loss': (9537, 1, 47680, 2.39476)}),
    ("megatron_nemo_etc/NVIDIA_MegatronLM_t5_release_golden_values_100k_steps.json", "megatron_golden", 20001, 0, 0, {'step_time_ms': (20001, 1, 100000, 213.79000000000002), 'train_loss': (20001, 1, 100000, 1.9265)}),
    ("megatron_nemo_etc/haydenjohnson_bionemo_evo2_nemo2_finetune_100it_from_README.log", "nemo", 100, 0, 0, {'lr': (100, 0, 99, 3e-05), 'step_time_ms': (100, 0, 99, 261.0), 'train_loss': (100, 0, 99, 1.294), 'val_loss': (1, 50, 50, 1.619)}),
    ("megatron_nemo_etc/loveofguoke_torchtitan_glm5_npu_1000steps_runtime.log", "torchtitan", 1000, 0, 0, {'grad_norm': (1000, 1, 1000, 0.4941), 'train_loss': (1000, 1, 1000, 2.69432)}),
    ("megatron_nemo_etc/starksim_megatron_deepspeed_qwen7b_baseline_500.log", "megatron", 508, 0, 0, {'checkpoint_saved': (1, 500, 500, 1.0), 'grad_norm': (500, 1, 500, 4.05), 'lr': (500, 1, 500, 1e-06), 'step_time_ms': (500, 1, 500, 18988.0), 'tokens': (500, 1, 500, 16384000.0), 'train_loss': (500, 1, 500, 6.234454), 'val_loss': (5, 100, 500, 6.335348)}),
    ("modded_nanogpt/2024-10-09_SOAP.txt", "modded_nanogpt", 6049, 0, 0, {'step_time_ms': (5999, 2, 6000, 256.0), 'train_loss': (6000, 1, 6000, 3.4305), 'val_loss': (49, 0, 6000, 3.2763)}),
    ("modded_nanogpt/2024-12-04_ValueEmbed.txt", "modded_nanogpt", 1544, 0, 0, {'step_time_ms': (1529, 2, 1530, 179.0), 'train_loss': (1530, 1, 1530, 3.2364), 'val_loss': (14, 0, 1530, 3.2751)}),
    ("modded_nanogpt/2025-07-12_BosAlign.txt", "modded_nanogpt", 1765, 0, 0, {'step_time_ms': (1749, 2, 1750, 105.0), 'val_loss': (15, 0, 1750, 3.2784)}),
    ("modded_nanogpt/2026-07-17_FP8DownProjection.txt", "modded_nanogpt", 1397, 0, 0, {'step_time_ms': (1389, 2, 1390, 84.0), 'val_loss': (7, 0, 1390, 3.2775)}),
    ("modded_nanogpt/paramgolf_HNet_byte260_4h.log", "modded_nanogpt", 523, 0, 0, {'step_time_ms': (435, 2, 85200, 192.255), 'train_loss': (436, 1, 85200, 0.9061), 'val_loss': (87, 0, 85242, 0.9181)}),
    ("modded_nanogpt/paramgolf_SmearGateBOSFix_seed42.log", "modded_nanogpt", 17, 0, 0, {'step_time_ms': (13, 2, 4500, 132.0), 'train_loss': (14, 1, 4500, 2.283), 'val_loss': (3, 0, 4942, 2.3534)}),
    ("modded_nanogpt/track2_2025-01-18_gpt2medium.txt", "modded_nanogpt", 7561, 0, 0, {'step_time_ms': (7499, 2, 7500, 244.0), 'val_loss': (61, 0, 7500, 2.9166)}),
    ("modded_nanogpt/track3_20260430_adamh_seconds.txt", "modded_nanogpt", 4915, 0, 0, {'step_time_ms': (4874, 2, 4875, 150.0), 'val_loss': (40, 0, 4875, 3.27637)}),
    ("modded_nanogpt/track3_tailema_official_seed0.stdout", "modded_nanogpt", 26, 0, 0, {'val_loss': (26, 125, 2720, 3.27978)}),
    ("nanogpt/CeciliaGuo_buildnanogpt_logtxt_full_19072.txt", "build_nanogpt_logtxt", 19229, 0, 0, {'hellaswag': (78, 0, 19072, 0.3032), 'train_loss': (19073, 0, 19072, 3.106784), 'val_loss': (78, 0, 19072, 3.0316)}),
    ("nanogpt/CeciliaGuo_finetune_step_train_loss_val_loss.txt", "build_nanogpt_logtxt", 750, 1, 10, {'train_loss': (600, 0, 599, 2.905877), 'val_loss': (9, 100, 550, 2.2843)}),
    ("nanogpt/ChristineChan_seem3650_code_generation_nb.log", "nanogpt", 206, 0, 0, {'checkpoint_saved': (1, 500, 500, 1.0), 'step_time_ms': (201, 0, 2000, 41745.57), 'train_loss': (201, 0, 2000, 0.2356), 'val_loss': (5, 0, 2000, 1.6525)}),
    ("nanogpt/ChristineChan_seem3650_layers_sweep_nb.log", "nanogpt", 320, 0, 3, {'checkpoint_saved': (3, 250, 750, 1.0), 'step_time_ms': (76, 0, 750, 24024.45), 'train_loss': (76, 0, 750, 1.4797), 'val_loss': (4, 0, 750, 1.6265)}),
    ("nanogpt/ChristineChan_seem3650_shakespeare_char_5000iter_nb.log", "nanogpt", 522, 0, 0, {'checkpoint_saved': (7, 250, 1750, 1.0), 'step_time_ms': (501, 0, 5000, 82515.27), 'train_loss': (501, 0, 5000, 0.8159), 'val_loss': (21, 0, 5000, 1.7077)}),
    ("nanogpt/LorenMak_seem3650_code_generation.txt", "nanogpt", 26, 0, 0, {'checkpoint_saved': (4, 250, 1000, 1.0), 'step_time_ms': (21, 0, 1000, 262.26), 'train_loss': (21, 0, 1000, 1.1717), 'val_loss': (5, 0, 1000, 1.4234)}),
    ("nanogpt/LorenMak_seem3650_layers7_heads4.txt", "nanogpt", 26, 0, 0, {'checkpoint_saved': (4, 250, 1000, 1.0), 'step_time_ms': (21, 0, 1000, 395.2), 'train_loss': (21, 0, 1000, 1.5188), 'val_loss': (5, 0, 1000, 1.7121)}),
    ("nanogpt/Vicky030_seem3650_shakespeare_char_nb.log", "nanogpt", 106, 0, 0, {'checkpoint_saved': (4, 250, 1000, 1.0), 'step_time_ms': (101, 0, 1000, 75600.02), 'train_loss': (101, 0, 1000, 1.3337), 'val_loss': (5, 0, 1000, 1.5166)}),
    ("nanogpt/csabapalfi_buildnanogpt_logtxt_epoch2_resumed.txt", "build_nanogpt_logtxt", 19230, 0, 0, {'hellaswag': (78, 19080, 38145, 0.3172), 'train_loss': (19074, 19072, 38145, 2.992749), 'val_loss': (78, 19080, 38145, 3.0167)}),
    ("nanogpt/csabapalfi_buildnanogpt_stdout_2xh100_epoch1.log", "build_nanogpt", 19073, 0, 0, {'grad_norm': (19073, 0, 19072, 0.3275), 'hellaswag': (78, 0, 19072, 0.3074), 'lr': (19073, 0, 19072, 6e-05), 'step_time_ms': (19073, 0, 19072, 20075.81), 'train_loss': (19073, 0, 19072, 3.106661), 'val_loss': (78, 0, 19072, 3.0717)}),
    ("nanogpt/ethellight_nanogpt_seis_bracketed_train_eval.log", "nanogpt", 817, 0, 0, {'lr': (17, 0, 8000, 3e-05), 'step_time_ms': (800, 10, 8000, 4499.0), 'train_loss': (800, 10, 8000, 2.1367), 'val_loss': (17, 0, 8000, 2.288)}),
    ("tensorboard/AbdulAA_lstm_textgen_lightning.events.out.tfevents.1716735746.99c8c45923de.3769.0", "tensorboard", 15441, 0, 0, {'train_loss': (7691, 49, 384549, 0.23888538777828217), 'val_loss': (29, 13261, 384597, 0.2555515468120575)}),
    ("tensorboard/EnderXiao_SATD_lightning_lrSGD.events.out.tfevents.1699875277.Ender-PC.10072.0", "tensorboard", 1081, 0, 0, {'train_loss': (240, 1103, 264959, 0.01330003421753645), 'val_loss': (120, 2207, 264959, 0.37548357248306274)}),
    ("tensorboard/fyh2001_swift_hf_trainer_gemma4_full_epoch.events.out.tfevents.1777063938.am4g1r39bm1.146032.0", "tensorboard", 11771, 0, 0, {'grad_norm': (2353, 1, 2353, 8.5625), 'lr': (2353, 1, 2353, 0.0), 'train_loss': (2353, 1, 2353, 1.257568359375)}),
    ("wandb_fairseq/fairseq_issue514_old_format_epoch_summary_excerpt.log", "fairseq", 7, 0, 0, {'grad_norm': (3, 22897, 25634, 1.279), 'lr': (3, 22897, 25634, 0.000197511), 'train_loss': (3, 22897, 25634, 6.144), 'val_loss': (2, 21896, 24633, 6.37204)}),
    ("wandb_fairseq/fairseq_issue940_old_format_excerpt.log", "fairseq", 6, 0, 0, {'grad_norm': (5, 445, 645, 1.419), 'lr': (5, 445, 645, 0.000129084), 'train_loss': (5, 445, 645, 10.902), 'val_loss': (1, 600, 600, 8.11425)}),
    ("wandb_fairseq/shunji_100knock2022_fairseq_colab_tqdm_oom_truncated_nb.log", "fairseq", 110, 0, 0, {'grad_norm': (6, 8000, 8500, 1.817), 'lr': (6, 8000, 8500, 0.0001), 'train_loss': (6, 8000, 8500, 4.427), 'val_loss': (1, 8553, 8553, 5.329)}),
]


@needs_real_logs
@pytest.mark.parametrize("name, fmt, rows, skipped, restarts, metrics", REAL, ids=[r[0] for r in REAL])
def test_real_log(name: str, fmt: str, rows: int, skipped: int, restarts: int, metrics: dict) -> None:
    table = read_log(REAL_LOGS / name)
    report = log_report(table)
    assert (table.format, table.rows, table.skipped_lines, table.restarts) == (fmt, rows, skipped, restarts)
    for metric, (count, first, last_step, last) in metrics.items():
        got = report["metrics"][metric]
        assert (got["count"], got["first_step"], got["last_step"]) == (count, first, last_step), metric
        assert got["last"] == pytest.approx(last, rel=1e-9), metric


@needs_real_logs
def test_every_real_log_has_a_test() -> None:
    files = {p.relative_to(REAL_LOGS).as_posix() for p in REAL_LOGS.glob("*/*") if p.is_file()}
    assert files == {r[0] for r in REAL}


@needs_real_logs
def test_real_log_spot_values() -> None:
    """Values in the middle of curves, read off the files by eye."""
    def value(name: str, metric: str, step: int) -> float:
        series = read_log(REAL_LOGS / name).series(metric)
        return float(series.loc[series["step"] == step, "value"].iloc[-1])

    assert value("nanogpt/ChristineChan_seem3650_shakespeare_char_5000iter_nb.log", "val_loss", 2500) == pytest.approx(1.4955, abs=0.02)
    assert value("megatron_nemo_etc/starksim_megatron_deepspeed_qwen7b_baseline_500.log", "val_loss", 100) == 7.66649
    assert value("megatron_nemo_etc/starksim_megatron_deepspeed_qwen7b_baseline_500.log", "step_time_ms", 101) == 66699.5
    assert value("modded_nanogpt/2024-10-09_SOAP.txt", "train_loss", 1) == 11.0091
    assert value("modded_nanogpt/track3_20260430_adamh_seconds.txt", "train_time_ms", 1) == pytest.approx(5418.0)
    assert value("modded_nanogpt/paramgolf_SmearGateBOSFix_seed42.log", "train_time_ms", 4500) == pytest.approx(8.8 * 60000)
    assert value("megatron_nemo_etc/loveofguoke_torchtitan_glm5_npu_1000steps_runtime.log", "tokens_per_sec", 2) == 4748
    assert value("llmc/modded_2024-10-13_llmc_main.log", "train_loss", 1) == 10.9598
    assert value("nanogpt/csabapalfi_buildnanogpt_stdout_2xh100_epoch1.log", "val_loss", 250) == 6.176
    assert value("hf_trainer_stdout/fyh2001_swift_gemma4_full_epoch_stdout.log", "grad_norm", 3) == 172


@needs_real_logs
def test_same_run_three_ways_agrees() -> None:
    """ms-swift stdout, logging.jsonl and TensorBoard of one run give the same loss curve."""
    names = ["hf_trainer_stdout/fyh2001_swift_gemma4_full_epoch_stdout.log",
             "generic_csv_jsonl/fyh2001_swift_gemma4_full_epoch_logging.jsonl",
             "tensorboard/fyh2001_swift_hf_trainer_gemma4_full_epoch.events.out.tfevents.1777063938.am4g1r39bm1.146032.0"]
    curves = [read_log(REAL_LOGS / n).series("train_loss") for n in names]
    for curve in curves[1:]:
        assert curve["step"].tolist() == curves[0]["step"].tolist()
        np.testing.assert_allclose(curve["value"], curves[0]["value"], rtol=2e-3)


@needs_real_logs
def test_real_multi_run_log_keeps_its_segments() -> None:
    """MANIFEST: four n_layer runs concatenated, each 0..750; the last run is the curve."""
    table = read_log(REAL_LOGS / "nanogpt/ChristineChan_seem3650_layers_sweep_nb.log")
    assert table.segments == ((0, 750),) * 4
    assert table.series("val_loss")["value"].tolist()[-1] == 1.6265


@needs_real_logs
def test_trainer_state_notes_say_loss_is_window_mean_and_nan_filtered() -> None:
    notes = " ".join(read_log(REAL_LOGS / "hf_trainer_state/NSLLM_trainer_state.json").notes)
    assert "mean over each logging window" in notes and "NaN/inf" in notes


# --- restarts, NaN, bad input ----------------------------------------------------------
def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_restart_later_segment_wins(tmp_path: Path) -> None:
    """A resume from step 20 replaces the first run's steps >= 20 (ISSUE 3: restarts)."""
    lines = [f"iter {i}: loss {5 - i / 100:.4f}, time 10.00ms, mfu 1.00%" for i in range(0, 40, 10)]
    lines += [f"iter {i}: loss {1 + i / 1000:.4f}, time 10.00ms, mfu 1.00%" for i in range(20, 60, 10)]
    table = read_log(_write(tmp_path, "train.log", "\n".join(lines) + "\n"))
    loss = table.series("train_loss")
    assert table.restarts == 1 and table.segments == ((0, 30), (20, 50))
    assert loss["step"].tolist() == [0, 10, 20, 30, 40, 50]
    assert loss["value"].tolist() == [5.0, 4.9, 1.02, 1.03, 1.04, 1.05]


def test_restart_in_jsonl_fallback_and_fast_path_agree(tmp_path: Path) -> None:
    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 2, 3, 4)]
    fast = read_log(_write(tmp_path, "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n"))
    slow = read_log(_write(tmp_path, "b.jsonl", "\n".join(json.dumps(r) for r in rows) + "\nnot json\n"))
    for table in (fast, slow):
        assert table.restarts == 1
        assert table.series("train_loss")["step"].tolist() == [1, 2, 3, 4]
    assert (fast.skipped_lines, slow.skipped_lines) == (0, 1)


@pytest.mark.parametrize("name, text", [
    ("a.jsonl", '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": NaN}\n{"step": 3, "loss": Infinity}\n'),
    ("train.log", "iter 1: loss 2.0000, time 1.00ms, mfu 1.00%\niter 2: loss nan, time 1.00ms, mfu 1.00%\n"
                  "iter 3: loss inf, time 1.00ms, mfu 1.00%\n"),
    ("m.csv", "step,loss\n1,2.0\n2,nan\n3,inf\n"),
])
def test_nonfinite_values_are_kept_and_flagged(tmp_path: Path, name: str, text: str) -> None:
    table = read_log(_write(tmp_path, name, text))
    values = table.series("train_loss")["value"].to_numpy()
    assert len(values) == 3 and math.isnan(values[1]) and math.isinf(values[2])
    assert log_report(table)["metrics"]["train_loss"]["first_nonfinite_step"] == 2


def test_malformed_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    text = ("iter 0: loss 4.0000, time 10.00ms, mfu 1.00%\n"
            "iter 10: loss ???, time 10.00ms, mfu 1.00%\n"       # garbled value
            "iter 20: loss 3.0\n"                                 # truncated line
            "some unrelated output\n"
            "iter 30: loss 2.0000, time 10.00ms, mfu 1.00%\n")
    table = read_log(_write(tmp_path, "train.log", text))
    assert table.skipped_lines == 2
    assert table.series("train_loss")["step"].tolist() == [0, 30]


def test_unknown_file_exit_2_names_it_and_lists_formats(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _write(tmp_path, "notes.txt", "just some prose\nnothing to see\n")
    with pytest.raises(UnknownLogFormat, match="notes.txt"):
        read_log(path)
    assert cli_main(["logs", str(path)]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and all(name in err for name in LOG_READERS)


def test_binary_file_is_not_sniffed(tmp_path: Path) -> None:
    path = tmp_path / "blob.log"
    path.write_bytes(bytes(range(256)) * 64)
    assert sniff_format(path) is None


def test_huge_file_does_not_hang_the_sniffer(tmp_path: Path) -> None:
    """A 200 MB single-line text file: sniffing reads a bounded amount and returns quickly."""
    path = tmp_path / "huge.log"
    with path.open("wb") as f:
        chunk = b"x" * (1 << 20)
        for _ in range(200):
            f.write(chunk)
    start = time.perf_counter()
    assert sniff_format(path) is None
    assert time.perf_counter() - start < 5.0


def test_missing_file_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(LogParseError, match="no such file"):
        read_log(tmp_path / "absent.log")


def test_step_too_big_for_int64_is_skipped_not_fatal(tmp_path: Path) -> None:
    big = "9" * 30
    lines = [f"iter {big}: loss 1.0, time 1.0ms, mfu 1.0%", "iter 5: loss 1.0, time 1.0ms, mfu 1.0%",
             f"s:{big} trl:1.0", f"step:{big}/10 train_loss:1.0 train_time:1ms", f" iteration {big}/ 10 | lm loss: 1.0 |",
             f"{big} train 1.0", f"[titan] step: {big}  loss: 1.0", f"| epoch 001:  1 / 9 loss=1.0, num_updates={big}",
             "{'loss': 1.0, 'step': 1e30}", '{"step": 1e30, "loss": 1.0}', "step,loss", f"{big},1.0"]
    path = _write(tmp_path, "x.log", "\n".join(lines) + "\n")
    for name in TEXT_READERS:
        table = LOG_READERS[name].read(path)
        assert (table.frame["step"].abs() < 2**62).all()
    nano = LOG_READERS["nanogpt"].read(path)
    assert nano.series("train_loss")["step"].tolist() == [5] and nano.skipped_lines == 1


# --- property tests: no exception escapes a text reader ---------------------------------
TEXT_READERS = ["nanogpt", "build_nanogpt", "build_nanogpt_logtxt", "llmc", "modded_nanogpt", "megatron", "nemo",
                "torchtitan", "fairseq", "hf_stdout", "jsonl", "csv", "lightning_csv"]
SEED_LINES = [
    "iter 10: loss 3.0836, time 600.70ms, mfu 0.62%", "step 250: train loss 1.4073, val loss 1.6254",
    "saving checkpoint to out", "[train] iter 10: loss 8.8782 9905 ms/iter",
    "[eval] iter 500: train 3.7095 val 3.6459 lr 3.00e-04",
    "step     1 | loss: 10.902683 | lr 1.6783e-06 | norm: 14.8626 | dt: 793.68ms | tok/sec: 660575.83",
    "validation loss: 10.9512", "HellaSwag accuracy: 2492/10042=0.2482", "19250 val 3.1425", "0 hella 0.2476",
    "s:1 trl:10.9598 lr:0.000002 norm:15.24", "s:250 tel:6.1710",
    "step:1/6000 train_loss:11.0091 train_time:24179ms step_avg:nanms", "4500/20000 train_loss: 2.2830 train_time: 8.8m",
    " iteration      101/     500 | elapsed time per iteration (ms): 66699.5 | lm loss: 7.761578E+00 | grad norm: 4.834 |",
    " validation loss at iteration 100 | lm loss value: 7.666490E+00 |", "saving checkpoint at iteration     500 to /x",
    "Training epoch 0, iteration 1/99 | lr: 2e-05 | global_step: 1 | reduced_train_loss: 1.31 | val_loss: 1.2",
    "[rank0]:[titan] 2026-08-13 22:49:19,421 - root - INFO - step:  1  loss:  8.10081  grad_norm:  1.3505  tps: 4,748",
    "| epoch 001:    450 / 1891 loss=11.521, num_updates=445, lr=8.90889e-05, gnorm=1.543",
    "| epoch 001 | valid on 'valid' subset | valid_loss 8.11425 | num_updates 600",
    "{'loss': '1.921', 'grad_norm': '32.75', 'global_step/max_steps': '1/2353'}", "{'eval_loss': 1.8, 'epoch': 0.5}",
    '{"step": 3, "loss": 2.5, "extras": {"mfu": 0.4}}', '{"global_step/max_steps": "1/2353", "loss": 1.9}',
    "step,loss,val_loss", "1,2.5,", "epoch,step,train_loss_step,val_loss_epoch", "0,49,7.6,",
    "iter 99999999999999999999999: loss 1.0, time 1.0ms", "s:99999999999999999999999 tel:1.0",
]


def _mutate(line: str, data: st.DataObject) -> str:
    """A seed line with random characters replaced, inserted or cut off."""
    chars = list(line)
    for _ in range(data.draw(st.integers(0, 4))):
        where = data.draw(st.integers(0, len(chars)))
        action = data.draw(st.sampled_from(["insert", "replace", "truncate"]))
        junk = data.draw(st.text(min_size=1, max_size=3))
        if action == "insert":
            chars[where:where] = list(junk)
        elif action == "replace" and where < len(chars):
            chars[where] = junk
        else:
            chars = chars[:where]
    return "".join(chars)


@settings(max_examples=int(os.environ.get("CKPT_SELECT_FUZZ_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_text_readers_never_raise_on_random_or_mutated_lines(tmp_path: Path, data: st.DataObject) -> None:
    lines = data.draw(st.lists(st.one_of(st.sampled_from(SEED_LINES), st.text(max_size=80)), min_size=1, max_size=25))
    lines = [_mutate(line, data) if data.draw(st.booleans()) else line for line in lines]
    path = tmp_path / "fuzz.log"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    sniff_format(path)
    for name in TEXT_READERS:
        try:
            table = LOG_READERS[name].read(path)
        except LogParseError:
            continue   # a typed "cannot read this at all" (e.g. a CSV with no header) is allowed
        assert table.rows >= 0 and table.skipped_lines >= 0
        assert list(table.frame.columns) == ["step", "metric", "value", "wall_time"]


# --- step timing -----------------------------------------------------------------------
def _timing_frame() -> pd.DataFrame:
    """100 steps of 100 ms; eval at 20/60 (+900 ms), eval+checkpoint at 40 (+1900 ms), a stall at 80."""
    rows = [(s, "step_time_ms", 100.0) for s in range(100)]
    extra = {20: 900.0, 60: 900.0, 40: 1900.0, 80: 400.0}
    rows = [(s, m, v + extra.get(s, 0.0)) for s, m, v in rows]
    rows += [(s, "val_loss", 2.0) for s in (20, 40, 60)] + [(40, "checkpoint_saved", 1.0)]
    frame = pd.DataFrame(rows, columns=["step", "metric", "value"])
    frame["wall_time"] = np.nan
    return frame


def test_timing_separates_eval_and_checkpoint_iterations() -> None:
    timing = analyze_step_times(_timing_frame())
    assert timing.steady_step_ms == 100.0
    assert [(s.step, s.kind) for s in timing.slow] == [(20, "eval"), (40, "eval+checkpoint"), (60, "eval"), (80, "other")]
    assert timing.eval_cost_ms == 900.0 and timing.eval_checkpoint_cost_ms == 1900.0
    total = 100 * 100.0 + 900 * 2 + 1900 + 400
    assert timing.total_ms == total
    assert timing.eval_share == pytest.approx(1800 / total)
    assert timing.eval_checkpoint_share == pytest.approx(1900 / total)
    assert timing.other_slow_share == pytest.approx(400 / total)


def test_timing_without_step_times_is_empty() -> None:
    frame = _timing_frame()
    timing = analyze_step_times(frame[frame["metric"] != "step_time_ms"])
    assert timing.source is None and timing.steady_step_ms is None and timing.slow == ()


@needs_real_logs
def test_timing_on_real_nanogpt_log() -> None:
    """MANIFEST: eval/ckpt iterations ~83,000 ms vs ~590 ms, every 250th iteration."""
    table = read_log(REAL_LOGS / "nanogpt/ChristineChan_seem3650_shakespeare_char_5000iter_nb.log")
    timing = analyze_step_times(table.frame)
    assert timing.steady_step_ms == pytest.approx(590, rel=0.03)
    assert {s.step for s in timing.slow if s.kind != "warmup"} == set(range(250, 5001, 250))
    assert timing.eval_cost_ms == pytest.approx(82_000, rel=0.03)
    assert 0.3 < timing.eval_share + timing.eval_checkpoint_share < 0.4


@needs_real_logs
def test_timing_on_real_megatron_log() -> None:
    """MANIFEST: iterations 101/201/301/401 take 59-69 s vs ~17-19 s (they include the eval)."""
    table = read_log(REAL_LOGS / "megatron_nemo_etc/starksim_megatron_deepspeed_qwen7b_baseline_500.log")
    timing = analyze_step_times(table.frame)
    assert [(s.step, s.kind) for s in timing.slow] == [(101, "eval"), (201, "eval"), (301, "eval"), (401, "eval")]
    assert 17_000 < timing.steady_step_ms < 19_500


# --- open_run and the CLI contract -------------------------------------------------------
def test_open_run_merges_logs_by_step(tmp_path: Path) -> None:
    _write(tmp_path, "train.log", "iter 0: loss 4.0000, time 10.00ms, mfu 1.00%\niter 10: loss 3.0000, time 10.00ms, mfu 1.00%\n")
    _write(tmp_path, "metrics.jsonl", '{"step": 10, "hellaswag": 0.3}\n{"step": 20, "hellaswag": 0.31}\n')
    run = open_run(tmp_path)
    assert sorted(t.format for t in run.logs) == ["jsonl", "nanogpt"]
    assert run.metric("train_loss")["step"].tolist() == [0, 10]
    assert run.metric("hellaswag")["value"].tolist() == [0.3, 0.31]
    assert any("train.log" in note and "nanogpt" in note for note in run.notes)


def test_logs_json_contract(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _write(tmp_path, "train.log", "iter 0: loss 4.0000, time 10.00ms, mfu 1.00%\n"
                                         "iter 10: loss nan, time 10.00ms, mfu 1.00%\nbad line\n")
    assert cli_main(["logs", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)["logs"][0]
    assert set(doc) == {"path", "format", "rows", "skipped_lines", "restarts", "metrics"}
    assert doc["path"] == str(path) and doc["format"] == "nanogpt"
    assert doc["metrics"]["train_loss"] == {"count": 2, "first_step": 0, "last_step": 10, "last": None,
                                            "first_nonfinite_step": 10}


# --- formats and namings without a real sample here ----------------------------------------
@pytest.mark.parametrize("name, text, fmt, expected", [
    ("wandb_export.csv",
     'Step,"run-a - train/loss","run-a - train/loss__MIN","run-a - train/loss__MAX","run-a - eval/loss"\n'
     "1,2.5,2.4,2.6,\n2,2.4,2.3,2.5,2.45\n", "csv", {"train_loss": [2.5, 2.4], "val_loss": [2.45]}),
    ("titan.jsonl", '{"step": 1, "loss_metrics/global_avg_loss": 8.1, "extras": {"mfu": 0.4, "lr/AdamW": 3e-4}}\n'
                    '{"step": 2, "loss_metrics/global_avg_loss": 8.0, "extras": {"mfu": 0.41, "lr/AdamW": 3e-4}}\n',
     "jsonl", {"train_loss": [8.1, 8.0], "extras/mfu": [0.4, 0.41], "extras/lr/adamw": [3e-4, 3e-4]}),
    ("names.jsonl", '{"iter": 1, "lm loss": 3.0, "valid/loss": 3.1, "lr/AdamW": 1e-3, "grad norm": 0.5}\n',
     "jsonl", {"train_loss": [3.0], "val_loss": [3.1], "lr": [1e-3], "grad_norm": [0.5]}),
    ("names.csv", "global_step,train/loss,learning_rate,eval_loss\n10,2.0,1e-4,\n20,1.9,1e-4,2.1\n",
     "csv", {"train_loss": [2.0, 1.9], "lr": [1e-4, 1e-4], "val_loss": [2.1]}),
    ("trainer.out", "{'loss': 2.1, 'grad_norm': 1.5, 'learning_rate': 5e-05, 'epoch': 0.1}\n"
                    "{'loss': 1.9, 'grad_norm': 1.2, 'learning_rate': 4e-05, 'epoch': 0.2}\n"
                    "{'eval_loss': 1.8, 'eval_runtime': 3.0, 'epoch': 0.2}\n"
                    "{'train_runtime': 100.0, 'train_loss': 2.0, 'epoch': 0.2}\n",
     "hf_stdout", {"train_loss": [2.1, 1.9], "val_loss": [1.8], "summary/train_loss": [2.0]}),
    ("megatron.log", " [2024-05-01 10:00:00] iteration      100/  500000 | consumed samples:        51200 | "
                     "elapsed time per iteration (ms): 1234.5 | learning rate: 3.000E-04 | global batch size:   512 | "
                     "lm loss: 2.345678E+00 | loss scale: 1.0 | grad norm: 0.345 | number of skipped iterations:   0 |\n",
     "megatron", {"train_loss": [2.345678], "lr": [3e-4], "grad_norm": [0.345], "step_time_ms": [1234.5]}),
    ("old_nanogpt.log", "iter 0: loss 4.2000, time 500.00ms\niter 1: loss 4.1000, time 20.00ms\n",
     "nanogpt", {"train_loss": [4.2, 4.1], "step_time_ms": [500.0, 20.0]}),
])
def test_formats_and_namings(tmp_path: Path, name: str, text: str, fmt: str, expected: dict) -> None:
    table = read_log(_write(tmp_path, name, text))
    assert table.format == fmt
    for metric, values in expected.items():
        assert table.series(metric)["value"].tolist() == pytest.approx(values), metric


def _csv_cases() -> list[Path]:
    golden = [p for p in GOLDEN.glob("*/*.csv") if not p.name.endswith(".expected.csv")]
    real = sorted(REAL_LOGS.glob("*/*.csv")) if REAL_LOGS.is_dir() else []
    return golden + real


@pytest.mark.parametrize("path", _csv_cases(), ids=lambda p: p.name)
def test_csv_fast_path_equals_row_reader(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from analysis.logs import csv_jsonl
    monkeypatch.setattr(csv_jsonl, "MIN_FAST_BYTES", 0)
    fast, slow = (csv_jsonl.read_csv_records(path, "csv", fast=f) for f in (True, False))
    assert (fast.rows, fast.skipped_lines, fast.restarts) == (slow.rows, slow.skipped_lines, slow.restarts)
    key = ["metric", "step"]
    pd.testing.assert_frame_equal(fast.frame.sort_values(key).reset_index(drop=True),
                                  slow.frame.sort_values(key).reset_index(drop=True), atol=1e-3)


def test_csv_with_a_malformed_row_counts_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from analysis.logs import csv_jsonl
    monkeypatch.setattr(csv_jsonl, "MIN_FAST_BYTES", 0)
    table = read_log(_write(tmp_path, "m.csv", "step,loss\n1,2.0\n2,1.9,extra\n3\n4,1.7\n"))
    assert table.skipped_lines == 2 and table.series("train_loss")["step"].tolist() == [1, 4]
