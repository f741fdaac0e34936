"""Rules of the codebase that reviews would otherwise have to remember."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import analysis
from analysis.checkpoints import CHECKPOINT_READERS
from analysis.logs import LOG_READERS
from conftest import REPO

ANALYSIS = REPO / "analysis"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_analysis_never_imports_streamlit_or_app() -> None:
    offenders = [p for p in ANALYSIS.rglob("*.py") if _imports(p) & {"streamlit", "app", "cached", "charts", "state"}]
    assert offenders == []


def test_torch_load_is_always_weights_only() -> None:
    for path in ANALYSIS.rglob("*.py"):
        for match in re.finditer(r"torch\.load\(([^)]*)\)", path.read_text()):
            assert "weights_only=True" in match.group(1), f"{path}: torch.load without weights_only=True"


def test_public_api_is_sorted_and_importable() -> None:
    assert analysis.__all__ == sorted(analysis.__all__)
    for name in analysis.__all__:
        assert hasattr(analysis, name), name


def test_every_reader_is_in_the_readme_tables() -> None:
    readme = (REPO / "README.md").read_text()
    for name in list(LOG_READERS) + list(CHECKPOINT_READERS):
        assert re.search(rf"^\|\s*`{re.escape(name)}`\s*\|", readme, re.MULTILINE), f"{name} missing from README"


def test_readme_starts_with_the_two_commands() -> None:
    head = (REPO / "README.md").read_text()[:1500]
    assert head.index("make app") < head.index("make test")


def test_app_views_hold_no_analysis_logic() -> None:
    """Pages may call analysis but not reach into its private helpers."""
    for path in (REPO / "app").rglob("*.py"):
        assert not re.search(r"from analysis\.\S+ import _", path.read_text()), path
