"""Issue 20: the CLI and the app decide nothing themselves, so they cannot disagree.

One recipe builder (``recipe_for_selection``), one "same dtype" rule for mergekit configs
(``mergekit_same_dtype``), one reading of a run's storage inputs (``storage_inputs_from_run``),
one weight rule (``normalize_weights``) and one default merge folder (``default_merge_folder``),
each checked here through both front ends as a user drives them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.testing.v1 import AppTest

import analysis.recipe
from analysis.cli import main
from analysis.errors import InvalidArgument
from analysis.recipe import default_merge_folder, load_recipe, mergekit_same_dtype, recipe_for_selection
from analysis.selection import recommend
from analysis.run import open_run
from analysis.signals import assess_run
from analysis.storage import storage_inputs_from_run
from conftest import REPO, wait_for_merge

APP = str(REPO / "app" / "streamlit_app.py")


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recent runs are remembered on disk: keep each test's memory to itself."""
    monkeypatch.setenv("CKPT_SELECT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("CKPT_SELECT_ROOT", raising=False)


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """What the page hands to its download buttons, by file name (recorded on the way to Streamlit)."""
    seen: dict[str, bytes] = {}
    original = MediaFileManager.add

    def add(self, path_or_data, mimetype, coordinates, file_name=None, is_for_static_download=False):
        if file_name is not None:
            seen[file_name] = path_or_data.encode() if isinstance(path_or_data, str) else path_or_data
        return original(self, path_or_data, mimetype, coordinates, file_name, is_for_static_download)

    monkeypatch.setattr(MediaFileManager, "add", add)
    return seen


def _page(run: Path, page: str, monkeypatch: pytest.MonkeyPatch, selected: list[int] | None = None) -> AppTest:
    monkeypatch.setenv("CKPT_SELECT_RUN", str(run))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    if selected is not None:
        at.session_state["selected_steps"] = selected
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, at.exception
    return at


# --- one recipe builder ----------------------------------------------------------------------

def test_issue20_app_download_is_the_recipe_written_beside_its_merge(tiny_run: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    downloads: dict[str, bytes]) -> None:
    """Same text, byte for byte: dtype, source run, weights, hashes, reasons (no time stamp in a recipe)."""
    out = tmp_path / "merged"
    at = _page(tiny_run, "merge", monkeypatch, selected=[500, 550, 600])
    at.selectbox(key="out_dtype").set_value("bfloat16").run()
    at.text_input(key="out_dir").set_value(str(out)).run()
    at.button(key="merge_button").click().run()
    wait_for_merge(at)
    assert not at.error, [e.value for e in at.error]
    assert downloads["recipe.yaml"].decode() == (out / "recipe.yaml").read_text()
    assert downloads["mergekit_config.yml"].decode() == (out / "mergekit_config.yml").read_text()
    doc = yaml.safe_load((out / "recipe.yaml").read_text())
    assert doc["output_dtype"] == "bfloat16" and doc["source_run"] == str(tiny_run.resolve())
    assert [c["step"] for c in doc["checkpoints"]] == [500, 550, 600] and all(c["sha256"] for c in doc["checkpoints"])
    assert yaml.safe_load(downloads["mergekit_config.yml"])["out_dtype"] == "bfloat16"


def test_issue20_cli_and_app_build_the_same_recipe_for_the_recommendation(tiny_run: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          downloads: dict[str, bytes]) -> None:
    """`recommend -o` and the Merge page's download of the recommended selection: same inputs, weights, run."""
    assert main(["recommend", str(tiny_run), "-o", str(tmp_path / "cli.yaml")]) == 0
    _page(tiny_run, "merge", monkeypatch)
    (tmp_path / "app.yaml").write_bytes(downloads["recipe.yaml"])
    cli, app = load_recipe(tmp_path / "cli.yaml"), load_recipe(tmp_path / "app.yaml")
    assert (app.method, app.output_dtype, app.source_run) == (cli.method, cli.output_dtype, cli.source_run)
    assert app.checkpoints == cli.checkpoints    # paths, steps, weights, sha256, quick hashes, sizes
    assert all(app.reasons[step] == cli.reasons[step] for step in app.reasons)


def test_issue20_recommend_hashes_only_a_recipe_it_writes_or_shows(tiny_run: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    hashed: list[tuple[Path, ...]] = []
    original = analysis.recipe.checkpoint_sha256
    monkeypatch.setattr(analysis.recipe, "checkpoint_sha256",
                        lambda files, progress=None: hashed.append(tuple(files)) or original(files, progress))
    assert main(["recommend", str(tiny_run)]) == 0
    assert hashed == [] and "step" in capsys.readouterr().out
    assert main(["recommend", str(tiny_run), "--json"]) == 0        # the JSON shows the recipe: hashed
    doc = json.loads(capsys.readouterr().out)
    assert len(hashed) == len(doc["checkpoints"]) and all(c["sha256"] for c in doc["recipe"]["checkpoints"])
    assert main(["recommend", str(tiny_run), "-o", str(tmp_path / "r.yaml")]) == 0
    assert len(hashed) == 2 * len(doc["checkpoints"])


def test_issue20_recipe_for_selection_normalises_and_names_the_run(tiny_run: Path) -> None:
    run = open_run(tiny_run)
    recipe = recipe_for_selection(run, [550, 600], (1.0, 3.0), "manual", "float16", {600: "newest"}, hashes=False)
    assert recipe.weights == (0.25, 0.75) and recipe.source_run == run.path and recipe.output_dtype == "float16"
    assert recipe.reasons == {"600": "newest"} and [e.sha256 for e in recipe.checkpoints] == ["", ""]
    with pytest.raises(InvalidArgument, match="finite non-negative"):
        recipe_for_selection(run, [550, 600], (1.0, float("nan")), "manual")
    with pytest.raises(InvalidArgument, match="output dtype"):
        recipe_for_selection(run, [550, 600], (1.0, 1.0), "manual", "int8")


# --- one "same" dtype for mergekit -----------------------------------------------------------

def _mixed_checkpoint(path: Path, step: int) -> Path:
    """bf16 weights, plus an fp32 norm and an int64 counter whose names sort first."""
    gen = torch.Generator().manual_seed(step)
    state = {"a_count": torch.tensor(step), "b_norm": torch.ones(4),
             "layer.weight": torch.randn(16, 16, generator=gen).to(torch.bfloat16)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"step": str(step)})
    return path


def test_issue20_merge_and_export_name_the_same_dtype_for_same(tmp_path: Path) -> None:
    """Before: the merge took the first tensor's dtype (here an int64 counter), export the first floating one."""
    a, b = _mixed_checkpoint(tmp_path / "a.safetensors", 10), _mixed_checkpoint(tmp_path / "b.safetensors", 20)
    out = tmp_path / "merged"
    assert main(["merge", "--checkpoints", str(a), "--checkpoints", str(b), "-o", str(out)]) == 0
    written = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert main(["export", str(out / "recipe.yaml"), "-o", str(tmp_path / "exported.yml")]) == 0
    exported = yaml.safe_load((tmp_path / "exported.yml").read_text())
    assert written["out_dtype"] == exported["out_dtype"] == "bfloat16"
    assert mergekit_same_dtype(load_recipe(out / "recipe.yaml")) == "bfloat16"


# --- one reading of a run's storage inputs ----------------------------------------------------

def _page_storage_inputs(at: AppTest) -> dict:
    window = next((c.value for c in at.caption if c.value.startswith("The recommended averaging window")), "")
    return {"params": at.number_input(key="st_params").value, "dtype": at.selectbox(key="st_dtype").value,
            "every_steps": at.number_input(key="st_every").value,
            "step_time_s": at.number_input(key="st_step").value,
            "window": int(window.split(" needs ")[1].split()[0]) if window else None}


@pytest.mark.parametrize("which", ["sample", "tiny"])
def test_issue20_storage_page_starts_from_what_storage_run_takes(which: str, sample_run: Path, tiny_run: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    run = sample_run if which == "sample" else tiny_run
    assert main(["storage", "--run", str(run), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    cli = {key: doc[key] for key in ("params", "dtype", "every_steps", "step_time_s", "window")}
    page = _page_storage_inputs(_page(run, "storage", monkeypatch))
    if cli["step_time_s"] is None:     # the tiny run logs no step times: the page shows its placeholder
        assert which == "tiny" and page.pop("step_time_s") == 1.5
        cli.pop("step_time_s")
    assert page == cli
    given = storage_inputs_from_run(open_run(run))
    assert (given.params, given.dtype, given.every_steps, given.window) == (
        doc["params"], doc["dtype"], doc["every_steps"], doc["window"])


def test_issue20_storage_inputs_from_the_sample_run() -> None:
    """Values a user can check by hand: the newest checkpoint's model elements (not its optimizer state),
    fp32, saves every 120 steps, the median logged step time, the recommendation's window."""
    run = open_run(REPO / "sample_runs" / "stdlib-gpt")
    given = storage_inputs_from_run(run)
    newest = torch.load(run.checkpoints[-1].path, weights_only=True)["model"]   # step_002880.pt, with Adam state
    assert given.params == sum(t.numel() for t in newest.values() if t.is_floating_point())
    assert given.dtype == "fp32" and given.every_steps == 120
    assert given.step_time_s == pytest.approx(run.metric("step_time_ms")["value"].median() / 1000)
    assert given.window == len(recommend(assess_run(run)).checkpoints)


def test_issue20_storage_cli_names_what_the_run_cannot_give(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A run of logs only has no checkpoint to count parameters in: the user is asked for them."""
    (tmp_path / "logs-only").mkdir()
    (tmp_path / "logs-only" / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "train_loss": 3.0 - s / 100}) for s in range(1, 50)) + "\n")
    assert main(["storage", "--run", str(tmp_path / "logs-only")]) == 2
    assert "--params" in capsys.readouterr().err
    assert main(["storage", "--run", str(tmp_path / "logs-only"), "--params", "1e6", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["params"] == 1e6 and doc["dtype"] == "bf16" and doc["window"] is None


# --- one weight rule, one default folder ------------------------------------------------------

def test_issue20_merge_page_default_folder_is_the_cores(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _page(tiny_run, "merge", monkeypatch, selected=[500, 600])    # not the recommendation: sma weights first
    expected = default_merge_folder(open_run(tiny_run).path, "sma", [500, 600])
    assert at.text_input(key="out_dir").value == str(expected) == str(tiny_run.resolve() / "merges" / "sma-500-600")


def test_issue20_merge_page_manual_weights_follow_normalize_weights(tiny_run: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    at = _page(tiny_run, "merge", monkeypatch, selected=[550, 600])
    at.segmented_control(key="weights_method").set_value("manual").run()
    weights = json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]["y"]
    assert weights == [0.5, 0.5] and not at.error
    at.session_state["manual_[550, 600]"] = {"edited_rows": {"0": {"weight": 3.0}}, "added_rows": [],
                                             "deleted_rows": []}
    at.run()
    assert json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]["y"] == [0.75, 0.25]
    at.session_state["manual_[550, 600]"] = {"edited_rows": {"0": {"weight": 0.0}, "1": {"weight": 0.0}},
                                             "added_rows": [], "deleted_rows": []}
    at.run()
    assert [e.value for e in at.error] == ["Manual weights: weights sum to zero. Give at least one checkpoint a positive weight."]
