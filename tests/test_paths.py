"""--root confinement: '..', absolute paths and symlinks cannot leave the root."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.errors import InvalidArgument
from analysis.paths import resolve_within


def test_paths_inside_the_root_resolve(tmp_path: Path) -> None:
    (tmp_path / "runs" / "a").mkdir(parents=True)
    assert resolve_within("runs/a", tmp_path) == (tmp_path / "runs" / "a").resolve()
    assert resolve_within(tmp_path / "runs" / "a" / ".." / "a", tmp_path) == (tmp_path / "runs" / "a").resolve()
    assert resolve_within("/anything/at/all", None) == Path("/anything/at/all")


@pytest.mark.parametrize("escape", ["..", "../other", "/etc", "runs/../../other"])
def test_dotdot_and_absolute_escapes_are_refused(tmp_path: Path, escape: str) -> None:
    root = tmp_path / "root"
    (root / "runs").mkdir(parents=True)
    with pytest.raises(InvalidArgument, match="outside the allowed folder"):
        resolve_within(escape, root)


def test_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidArgument, match="outside the allowed folder"):
        resolve_within("link", root)
    with pytest.raises(InvalidArgument):
        resolve_within(root / "link" / "model.safetensors", root)
