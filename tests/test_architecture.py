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


# --- front ends only draw (issue 20) ------------------------------------------------------------
VIEWS = sorted((REPO / "app" / "views").glob("*.py"))
CLI_MODULES = sorted((ANALYSIS / "cli").glob("*.py"))   # the command line: every module of the package
# Arithmetic a front end would otherwise redo beside the core (weights normalised by hand, a median
# of the run's step times, a total of sizes): the core has one function for each.
_ARITHMETIC_CALLS = {"sum", "fsum", "mean", "median", "nanmedian", "nanmean", "diff", "average", "cumsum", "prod"}


def _analysis_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every ``from analysis... import name`` in ``path``, relative imports resolved
    from the file's package."""
    package = ".".join(path.relative_to(REPO).parent.parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            if module.split(".")[0] == "analysis":
                found.extend((module, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            found.extend((a.name, "") for a in node.names if a.name.split(".")[0] == "analysis")
    return found


def _is_cli(module: str) -> bool:
    """A module of the command line itself: its helpers (``_emit``, ``_OPTIONS``...) are shared by its modules."""
    return module == "analysis.cli" or module.startswith("analysis.cli.")


def _calls(tree: ast.AST) -> set[str]:
    """Names of the functions and methods called anywhere in ``tree`` (``np.median(x)`` -> ``median``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            names.add(func.id if isinstance(func, ast.Name) else getattr(func, "attr", ""))
    return names


def test_front_ends_only_call_the_core_and_draw() -> None:
    """The rule: a view (app/views/*.py) or a CLI command (any module of analysis/cli/) calls the core's public
    functions and classes and draws or prints what they return; it decides nothing itself (issue 20: the two front ends
    had each rewritten weight validation, "same" dtype, storage defaults and the default merge folder, and
    disagreed). Checked as:

    1. from ``analysis`` they import only public names of public modules (no ``_name``, no ``analysis._mod``;
       the CLI's modules share their own ``_helpers`` with each other);
    2. they import neither numpy nor pandas: arithmetic on run data is the core's;
    3. they call no summing or averaging function (``sum``, ``np.median``, ``.mean()`` ...): weights go
       through ``normalize_weights``, a run's medians through ``storage_inputs_from_run`` and the like.
    Formatting (``f"{x / 1e6:.2f} MB"``) and the range of a chart stay: that is drawing.
    """
    assert len(CLI_MODULES) > 1, "the CLI package's modules were not found"
    for path in VIEWS + CLI_MODULES:
        private = [f"{m}.{n}" for m, n in _analysis_imports(path) if not _is_cli(m)
                   and ((n.startswith("_") and n != "__version__") or any(p.startswith("_") for p in m.split(".")))]
        assert private == [], f"{path.name} imports private names of the core: {private}"
        assert not _imports(path) & {"numpy", "pandas"}, f"{path.name} imports numpy or pandas"
        tree = ast.parse(path.read_text())
        arithmetic = _calls(tree) & _ARITHMETIC_CALLS
        assert not arithmetic, f"{path.name} does arithmetic the core owns: {sorted(arithmetic)}"


def test_the_app_never_imports_private_core_modules() -> None:
    """app/ (views, caches, charts) reaches the core through its public modules and names only."""
    for path in (REPO / "app").rglob("*.py"):
        for module, name in _analysis_imports(path):
            assert not any(part.startswith("_") for part in module.split(".")), f"{path}: imports {module}"
            assert not name.startswith("_"), f"{path}: imports {module}.{name}"


def test_the_front_ends_share_the_cores_rules() -> None:
    """Each rule issue 20 moved into the core is called by both front ends (or by the app's cache for them)."""
    app_code = "".join(p.read_text() for p in [REPO / "app" / "cached.py"] + VIEWS)
    cli_code = "".join(p.read_text() for p in CLI_MODULES)
    for rule in ("recipe_for_selection", "dump_mergekit", "storage_inputs_from_run"):
        assert rule in app_code and rule in cli_code, rule
    assert "normalize_weights" in app_code and "default_merge_folder" in app_code
