"""Issue 19: every bad input is exit 2 with one line naming the file and the problem, never a traceback,
and nothing is written; what CkptSelect accepts and writes is what ``safetensors.safe_open`` accepts.

Safetensors files here are built byte by byte (8-byte little-endian header length + JSON + data):
the broken headers are what the library would never write.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from analysis.checkpoints import open_checkpoint
from analysis.checkpoints.safetensors_file import SAFETENSORS_DTYPES, read_header
from analysis.checkpoints.safetensors_writer import SafetensorsWriter
from analysis.checkpoints.base import TensorInfo
from analysis.cli import main
from analysis.errors import AnalysisError, CheckpointReadError, MergeError
from analysis.recipe import build_recipe, write_recipe
from analysis.run import checkpoint_ref
from conftest import REPO

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
            "I8": 1, "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1}


def raw_safetensors(path: Path, header: object, data: bytes, *, length: int | None = None,
                    header_bytes: bytes | None = None) -> Path:
    """Write a safetensors file by hand: ``length`` overrides the 8-byte header length."""
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def f32(shape: list, offsets: list, **extra: object) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": offsets, **extra}


def safe_open_reads(path: Path) -> dict[str, torch.Tensor] | None:
    """Every tensor as the format's own reader gives it, or None when it refuses the file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception:   # noqa: BLE001 - any refusal counts (SafetensorError, ValueError, TypeError...)
        return None


def assert_one_line_error(capsys: pytest.CaptureFixture, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ckpt-select: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_nothing_written(parent: Path, out: Path) -> None:
    """No output and no hidden partial folder beside it."""
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]


def good_file(path: Path, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    save_file({"a": torch.randn(64, generator=gen), "n": torch.tensor(seed)}, str(path))
    return path


# --- 1. headers as strict as the format's reader -----------------------------------------------------------

BAD_HEADERS = {   # case -> (header, data bytes, header length override, words the message must hold)
    "string offsets": ({"a": f32([64], ["0", "256"])}, bytes(256), None, ["'a'", "data_offsets"]),
    "metadata a list": ({"__metadata__": [1], "a": f32([64], [0, 256])}, bytes(256), None, ["__metadata__"]),
    "metadata value not a string": ({"__metadata__": {"step": 5}, "a": f32([64], [0, 256])}, bytes(256), None,
                                    ["__metadata__"]),
    "negative dimensions": ({"a": f32([-64, -64], [0, 16384])}, bytes(16384), None, ["'a'", "shape"]),
    "fractional dimension": ({"a": f32([64.0], [0, 256])}, bytes(256), None, ["'a'", "shape"]),
    "boolean dimension": ({"a": f32([True, 64], [0, 256])}, bytes(256), None, ["'a'", "shape"]),
    "string dimension": ({"a": f32(["64"], [0, 256])}, bytes(256), None, ["'a'", "shape"]),
    "unknown dtype": ({"a": {"dtype": "F33", "shape": [64], "data_offsets": [0, 256]}}, bytes(256), None,
                      ["'a'", "F33"]),
    "size not shape x itemsize": ({"a": f32([64], [0, 128])}, bytes(128), None, ["'a'", "128 bytes"]),
    "trailing bytes": ({"a": f32([64], [0, 256])}, bytes(300), None, ["44 bytes after"]),
    "overlap": ({"a": f32([32], [0, 128]), "b": f32([32], [0, 128])}, bytes(256), None, ["overlaps"]),
    "three offsets": ({"a": f32([64], [0, 256, 256])}, bytes(256), None, ["'a'", "data_offsets"]),
    "offsets reversed": ({"a": f32([0], [256, 0])}, bytes(256), None, ["'a'"]),
    "header length past the file": ({"a": f32([64], [0, 256])}, bytes(256), 10_000, ["header length 10000"]),
    "header not an object": ([1, 2], b"", None, ["not a JSON object"]),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_header_is_refused_as_safe_open_refuses_it(case: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """Issue 19: each header safe_open refuses is exit 2, one line naming file and tensor, for analyze and merge."""
    header, data, length, words = BAD_HEADERS[case]
    run = tmp_path / "run"
    run.mkdir()
    bad = raw_safetensors(run / "model.safetensors", header, data, length=length)
    assert safe_open_reads(bad) is None          # the format's reader refuses it: so must we
    with pytest.raises(CheckpointReadError) as info:
        read_header(bad)
    assert str(bad) in str(info.value)
    assert main(["analyze", str(run)]) == 2
    assert_one_line_error(capsys, "model.safetensors", *words)
    out = tmp_path / "merged"
    other = good_file(tmp_path / "good.safetensors")
    assert main(["merge", "--checkpoints", str(other), "--checkpoints", str(bad), "-o", str(out)]) == 2
    assert_one_line_error(capsys, str(bad), *words)
    assert_nothing_written(tmp_path, out)


def test_overlap_at_the_same_byte_is_called_an_overlap(tmp_path: Path) -> None:
    """Issue 19: two tensors starting at the same byte were reported as a gap."""
    bad = raw_safetensors(tmp_path / "x.safetensors",
                          {"a": f32([64], [0, 256]), "b": f32([32], [0, 128]), "c": f32([32], [256, 384])}, bytes(384))
    with pytest.raises(CheckpointReadError, match=r"tensor 'a' overlaps tensor 'b'"):
        read_header(bad)


def test_accepts_what_safe_open_accepts(tmp_path: Path) -> None:
    """The strict reader still takes the format's lawful oddities: a list-form entry, extra fields, null
    metadata, scalars, zero-size tensors sharing an offset, a header padded with spaces."""
    header = {"__metadata__": None, "a": ["F32", [2], [0, 8]], "s": f32([], [8, 12], note="x"),
              "z": f32([0, 3], [12, 12]), "y": f32([0], [12, 12])}
    path = raw_safetensors(tmp_path / "odd.safetensors", None, bytes(12),
                           header_bytes=json.dumps(header).encode() + b"    ")
    expected = safe_open_reads(path)
    assert expected is not None
    with open_checkpoint(path) as handle:
        assert {i.name: i.shape for i in handle.tensors()} == {k: tuple(v.shape) for k, v in expected.items()}


@pytest.mark.parametrize("weight_map", [{"a": 5}, ["model-00001.safetensors"], {"a": None}])
def test_index_weight_map_values_must_be_file_names(weight_map: object, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """Issue 19: ``"weight_map": {"a": 5}`` raised a TypeError (exit 1 with a traceback)."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "merged"
    other = good_file(tmp_path / "good.safetensors")
    assert main(["merge", "--checkpoints", str(other), "--checkpoints", str(index), "-o", str(out)]) == 2
    assert_one_line_error(capsys, "model.safetensors.index.json", "weight_map")
    assert_nothing_written(tmp_path, out)


# --- 2. the writer never writes a file safe_open refuses ---------------------------------------------------

def test_negative_shapes_are_not_merged_into_a_file_nothing_opens(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """Issue 19: two inputs with shape [-64, -64] merged (exit 0) into a file safe_open rejects."""
    inputs = [raw_safetensors(tmp_path / f"neg{i}.safetensors", {"a": f32([-64, -64], [0, 16384])}, bytes(16384))
              for i in range(2)]
    out = tmp_path / "merged"
    assert main(["merge", "--checkpoints", str(inputs[0]), "--checkpoints", str(inputs[1]), "-o", str(out)]) == 2
    assert_one_line_error(capsys, "neg0.safetensors", "shape")
    assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize("info", [TensorInfo("a", (-64, -64), "float32", 16384), TensorInfo("a", (2.5,), "float32", 10),
                                  TensorInfo("a", (4,), "complex64", 32)])
def test_writer_refuses_a_header_safe_open_would_refuse(info: TensorInfo, tmp_path: Path) -> None:
    """Issue 19: the writer is the last line of defence; it fails before writing a byte."""
    path = tmp_path / "out.safetensors"
    with pytest.raises(MergeError, match="tensor 'a'"):
        SafetensorsWriter(path, [info])
    assert not path.exists()


# --- property: mutated headers -----------------------------------------------------------------------------

_ODD_VALUES = st.sampled_from(["0", "256", 1.0, 2.5, True, False, None, -1, -64, 1 << 64, (1 << 64) - 1, [], {}, [1],
                               "F32", "f32", "F4", "C64", "F8_E8M0", "I33", 0, 3, 7, 8, 1000])


@st.composite
def safetensors_bytes(draw: st.DrawFn) -> tuple[object, bytes, int | None]:
    """A valid little file, then up to three mutations of types, signs, offsets, dtypes and lengths."""
    names = draw(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=3, unique=True))
    header: dict = {}
    position = 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        shape = draw(st.lists(st.integers(0, 4), max_size=2))
        size = ITEMSIZE[dtype] * (shape[0] if shape else 1) * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + size]}
        position += size
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    data = bytearray(draw(st.binary(min_size=position, max_size=position)))
    length = None
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["field", "dim", "offset", "shift", "metadata", "data", "length", "drop", "list"]))
        name = draw(st.sampled_from(names))
        entry = header[name]
        if kind == "field" and isinstance(entry, dict):
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(_ODD_VALUES)
        elif kind == "dim" and isinstance(entry, dict) and isinstance(entry.get("shape"), list) and entry["shape"]:
            entry["shape"][draw(st.integers(0, len(entry["shape"]) - 1))] = draw(_ODD_VALUES)
        elif kind == "offset" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list):
            offsets = entry["data_offsets"]
            if offsets:
                offsets[draw(st.integers(0, len(offsets) - 1))] = draw(_ODD_VALUES)
        elif kind == "shift" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list):
            delta = draw(st.integers(-8, 8))
            entry["data_offsets"] = [o + delta if type(o) is int else o for o in entry["data_offsets"]]
        elif kind == "metadata":
            header["__metadata__"] = draw(st.sampled_from([None, [1], {"k": 1}, {"k": "v"}, "x", {"k": None}]))
        elif kind == "data":
            cut = draw(st.integers(-8, 8))
            data = data[:cut] if cut < 0 else data + bytes(cut)
        elif kind == "length":
            length = draw(st.sampled_from([0, 1, 2, 7, 100_000_001, 1 << 63]))
        elif kind == "drop" and isinstance(entry, dict):
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif kind == "list" and isinstance(entry, dict) and len(entry) == 3:
            header[name] = [entry["dtype"], entry["shape"], entry["data_offsets"]]
    return header, bytes(data), length


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(safetensors_bytes())
def test_mutated_headers_are_read_as_safe_open_reads_them(case: tuple[object, bytes, int | None]) -> None:
    """Issue 19 (property): on any mutated header the reader raises CheckpointReadError or nothing, refuses
    whatever safe_open refuses, reads what it accepts at the same bytes, and merge is exit 0 with a file
    safe_open opens, or exit 2 with one line and nothing written."""
    header, data, length = case
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        path = raw_safetensors(folder / "x.safetensors", header, data, length=length)
        expected = safe_open_reads(path)
        ours = _our_tensors(path)
        if ours is None:
            assert expected is None or not _supported(header), f"safe_open accepts, we refuse: {header}"
        else:
            assert expected is not None, f"we accept what safe_open refuses: {header}"
            assert ours.keys() == expected.keys()
            for name, tensor in expected.items():
                shape, dtype, stored = ours[name]
                assert shape == tuple(tensor.shape) and dtype == str(tensor.dtype).removeprefix("torch.")
                assert stored == tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() \
                    else stored == b""
        _check_merge(folder, path, accepted=ours is not None)


def _supported(header: object) -> bool:
    """Whether every dtype is one CkptSelect merges (safe_open also opens F4, C64 ... which it refuses by name)."""
    entries = [v for k, v in header.items() if k != "__metadata__"] if isinstance(header, dict) else []
    dtypes = [e.get("dtype") if isinstance(e, dict) else e[0] if isinstance(e, list) and e else None for e in entries]
    return all(d in SAFETENSORS_DTYPES for d in dtypes)


def _our_tensors(path: Path) -> dict[str, tuple[tuple[int, ...], str, bytes]] | None:
    """(shape, dtype, the raw bytes at our offsets) by name, or None on CheckpointReadError (any other error fails)."""
    try:
        with open_checkpoint(path) as handle:
            result = {}
            for info in handle.tensors():
                loc = handle.locate(info.name)
                with path.open("rb") as raw:
                    raw.seek(loc.offset)
                    result[handle.original_name(info.name)] = (info.shape, info.dtype, raw.read(info.size_bytes))
            return result
    except CheckpointReadError:
        return None


def _check_merge(folder: Path, path: Path, accepted: bool) -> None:
    twin = folder / "twin.safetensors"
    shutil.copyfile(path, twin)
    out = folder / "merged"
    with _capture() as err:
        code = main(["merge", "--checkpoints", str(path), "--checkpoints", str(twin), "-o", str(out)])
    if not accepted:
        assert code == 2 and len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
        assert_nothing_written(folder, out)
        return
    assert code == 0, err.getvalue()
    assert "Traceback" not in err.getvalue()
    assert safe_open_reads(out / "model.safetensors") is not None


class _capture:
    """stderr of an in-process ``main`` (hypothesis examples cannot use the capsys fixture)."""

    def __enter__(self):
        import contextlib
        import io
        self._buffer = io.StringIO()
        self._redirect = contextlib.redirect_stderr(self._buffer)
        self._redirect.__enter__()
        return self._buffer

    def __exit__(self, *exc: object) -> None:
        self._redirect.__exit__(*exc)


# --- 3. errors are one line --------------------------------------------------------------------------------

def test_yaml_error_is_one_line_naming_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 19: a YAML error spanned four stderr lines; ``--verbose`` still shows PyYAML's report."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("ckpt_select_recipe: 1\ncheckpoints:\n  - path: a\n    weight: [1\n")
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), "-o", str(out)]) == 2
    line = assert_one_line_error(capsys, str(recipe), "not valid YAML", "line 5")
    assert "column" in line
    assert main(["--verbose", "merge", str(recipe), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ckpt-select: error: ") and "caused by:" in err
    assert "ScannerError" in err or "ParserError" in err, err
    assert_nothing_written(tmp_path, out)


EVALUATOR = '''
import torch

def evaluate(state_dict):
    values = [torch.tensor(t) for t in state_dict.values()]   # torch warns: copy-construct from a tensor
    return float(sum(v.float().sum() for v in values))
'''


def test_library_warnings_stay_off_stderr_unless_verbose(tiny_run: Path, tmp_path: Path) -> None:
    """Issue 19: torch's warnings leaked onto stderr; with --verbose they are shown."""
    evaluator = tmp_path / "evaluator.py"
    evaluator.write_text(EVALUATOR)
    args = ["recommend", str(tiny_run), "--eval", f"{evaluator}:evaluate", "--max-evals", "2", "--window", "2"]
    quiet = subprocess.run([sys.executable, "-m", "analysis", *args], capture_output=True, text=True, cwd=REPO,
                           timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "Warning" not in quiet.stderr and quiet.stderr.strip() == "", quiet.stderr
    loud = subprocess.run([sys.executable, "-m", "analysis", "--verbose", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert loud.returncode == 0 and "UserWarning" in loud.stderr, loud.stderr


# --- 4. weights, duplicates, dtypes, NaN ------------------------------------------------------------------

def _recipe(tmp_path: Path, change) -> Path:
    refs = [checkpoint_ref(good_file(tmp_path / f"c{i}.safetensors", i), 100 * (i + 1)) for i in range(2)]
    path = write_recipe(build_recipe("manual", refs, (0.5, 0.5)), tmp_path / "recipe.yaml")
    doc = yaml.safe_load(path.read_text())
    change(doc["checkpoints"])
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.parametrize("change, words", [
    (lambda c: c[0].update(weight="0.5"), ["checkpoints[0]", "c0.safetensors", "'0.5'", "must be a number"]),
    (lambda c: c[1].update(weight=True), ["checkpoints[1]", "c1.safetensors", "True", "must be a number"]),
    (lambda c: c[1].update(path=c[0]["path"]), ["checkpoints[1]", "the same checkpoint as checkpoints[0]"]),
], ids=["string", "bool", "duplicate"])
def test_recipe_weight_and_duplicate_entries_are_refused(change, words: list[str], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """Issue 19: "0.5", true and a repeated checkpoint were accepted silently."""
    recipe = _recipe(tmp_path, change)
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), "-o", str(out)]) == 2
    assert_one_line_error(capsys, "recipe.yaml", *words)
    assert_nothing_written(tmp_path, out)


def test_mergekit_string_weight_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 19: the mergekit form of a recipe gets the same weight check."""
    inputs = [good_file(tmp_path / f"c{i}.safetensors", i) for i in range(2)]
    config = tmp_path / "mergekit.yml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(inputs[0]), "parameters": {"weight": "0.5"}},
        {"model": str(inputs[1]), "parameters": {"weight": 0.5}}]}))
    assert main(["merge", str(config), "-o", str(tmp_path / "merged")]) == 2
    assert_one_line_error(capsys, "mergekit.yml", "models[0]", "must be a number")


@pytest.mark.parametrize("weights", [["nan", "1"], ["inf", "1"], ["-1", "2"]])
def test_non_finite_command_line_weights_are_refused(weights: list[str], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """Issue 19: ``--weights nan 1`` was echoed back normalised as [nan, 0.0]."""
    inputs = [good_file(tmp_path / f"c{i}.safetensors", i) for i in range(2)]
    out = tmp_path / "merged"
    args = ["merge", "--checkpoints", str(inputs[0]), "--checkpoints", str(inputs[1]), "-o", str(out)]
    for w in weights:
        args += ["--weights", w]
    assert main(args) == 2
    assert_one_line_error(capsys, "weights", "c0.safetensors")
    assert_nothing_written(tmp_path, out)


def test_the_same_checkpoint_twice_on_the_command_line_is_refused(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """Issue 19: a checkpoint given twice was merged silently (twice the weight)."""
    first = good_file(tmp_path / "c0.safetensors")
    (tmp_path / "link.safetensors").symlink_to(first)
    out = tmp_path / "merged"
    assert main(["merge", "--checkpoints", str(first), "--checkpoints", str(tmp_path / "link.safetensors"),
                 "-o", str(out)]) == 2
    assert_one_line_error(capsys, "--checkpoints[1]", "link.safetensors", "the same checkpoint as --checkpoints[0]")
    assert_nothing_written(tmp_path, out)


def test_int_and_float_tensors_of_one_name_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 19: an int tensor in one input and a float in another was averaged or copied silently."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.ones(4), "count": torch.tensor([3, 4], dtype=torch.int64)}, str(a))
    save_file({"w": torch.zeros(4), "count": torch.tensor([3.0, 4.0])}, str(b))
    out = tmp_path / "merged"
    assert main(["merge", "--checkpoints", str(a), "--checkpoints", str(b), "-o", str(out)]) == 2
    assert_one_line_error(capsys, "dtype differs", "count", "int64", "float32")
    assert_nothing_written(tmp_path, out)


def test_merging_a_nan_checkpoint_warns_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 19: a NaN input of ``merge --checkpoints`` was merged without a word; found in the merge's own pass."""
    good = good_file(tmp_path / "good.safetensors")
    bad = tmp_path / "bad.safetensors"
    values = torch.ones(64)
    values[3] = float("nan")
    save_file({"a": values, "n": torch.tensor(1)}, str(bad))
    out = tmp_path / "merged"
    assert main(["merge", "--checkpoints", str(good), "--checkpoints", str(bad), "-o", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt-select: warning: ") and str(bad) in lines[0], captured.err
    assert str(good) not in lines[0] and "'a'" in lines[0]
    assert json.loads(captured.out)["warnings"] == [lines[0].removeprefix("ckpt-select: warning: ")]
    merged = safe_open_reads(out / "model.safetensors")
    assert merged is not None and bool(merged["a"][3].isnan()) and bool(merged["a"][:3].isfinite().all())


def test_a_finite_merge_has_no_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = [good_file(tmp_path / f"c{i}.safetensors", i) for i in range(2)]
    out = tmp_path / "merged"
    assert main(["merge", "--checkpoints", str(inputs[0]), "--checkpoints", str(inputs[1]), "-o", str(out)]) == 0
    assert capsys.readouterr().err == ""
    assert safe_open_reads(out / "model.safetensors") is not None


# --- 5. a header-only CSV is an empty log --------------------------------------------------------------------

def test_header_only_csv_is_an_empty_log_of_its_format(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 19: a CSV holding its header and no row yet was "not a log format"."""
    log = tmp_path / "metrics.csv"
    log.write_text("step,train_loss,val_loss,lr\n")
    assert main(["logs", str(log), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)["logs"][0]
    assert doc["format"] == "csv" and doc["rows"] == 0 and doc["metrics"] == {}
    assert main(["logs", str(log)]) == 0
    assert "csv, 0 rows yet" in capsys.readouterr().out


def test_a_one_line_note_is_still_not_a_log(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    note = tmp_path / "notes.csv"
    note.write_text("remember to, buy milk\n")
    assert main(["logs", str(note)]) == 2
    assert_one_line_error(capsys, "notes.csv", "not a log format")


def test_analysis_error_messages_never_span_lines(capsys: pytest.CaptureFixture) -> None:
    """Whatever a library put in an error's text, the CLI prints it on one line."""
    from analysis.cli.entry_point import _one_line
    assert _one_line("first\n  second\n\nthird") == "first second third"
    assert issubclass(CheckpointReadError, AnalysisError)
