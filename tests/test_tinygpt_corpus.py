"""The sample trainer's corpus: which standard-library files train, validate and test, and the
bigger held-out split benchmarks score on, built from a small made-up library tree."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "sample_runs"))
from tinygpt import SEPARATOR, load_corpus, lib_tests_split  # noqa: E402


def _library(root: Path) -> dict[str, bytes]:
    """A library of modules and test suites, every file's text naming the file (so splits can be traced)."""
    names = [f"mod{i:02d}.py" for i in range(30)] + [f"pkg/sub{i}.py" for i in range(5)]
    names += [f"test/test_{i:02d}.py" for i in range(20)] + ["pkg/tests/test_pkg.py", "idlelib/idle_test/test_x.py"]
    names += ["site-packages/foo/test/test_foo.py", "encodings/cp.py", "test/big.py"]
    files = {}
    for name in names:
        body = (f"# {name}\n" + "x = 1\n" * (200 if name != "test/big.py" else 5000)).encode()
        files[name] = body
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(body)
    return files


def _names_in(data: np.ndarray) -> list[str]:
    return [part.split(b"\n")[0][2:].decode() for part in data.tobytes().split(SEPARATOR) if part.startswith(b"# ")]


def test_the_lib_tests_split_holds_whole_test_files_the_training_corpus_leaves_out(tmp_path: Path) -> None:
    files = _library(tmp_path)
    corpus = load_corpus(tmp_path, val_bytes=2000, test_bytes=2000)
    trained = set(_names_in(corpus.train))
    names, data = lib_tests_split(tmp_path, n_bytes=12000, max_file_bytes=4000)

    assert len(data) == 12000 and data.dtype == np.uint8
    assert all(n.startswith(("test/", "pkg/tests/", "idlelib/idle_test/")) for n in names)
    assert "test/big.py" not in names and not any("site-packages" in n for n in names)   # too big; not the stdlib's
    assert not set(names) & trained   # never trained on
    assert not set(names) & set(corpus.description["val_files"] + corpus.description["test_files"])
    # Whole files in order, joined by the separator; only the last may be cut.
    assert _names_in(data) == names
    assert data.tobytes().startswith(files[names[0]] + SEPARATOR)
    assert int((data == SEPARATOR[0]).sum()) in (len(names) - 1, len(names))
    # The same on every call (hash order of the paths, not of the file system's listing).
    again_names, again = lib_tests_split(tmp_path, n_bytes=12000, max_file_bytes=4000)
    assert again_names == names and np.array_equal(again, data)


def test_a_lib_tests_split_bigger_than_the_suites_is_refused(tmp_path: Path) -> None:
    _library(tmp_path)
    with pytest.raises(ValueError, match="test suites under .* hold"):
        lib_tests_split(tmp_path, n_bytes=10 ** 6, max_file_bytes=4000)
