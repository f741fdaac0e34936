"""Shared pytest configuration.

Options:
    --update-golden   rewrite tests/golden/**/<case>.expected.csv from the current
                      readers (review the git diff before committing).
"""

from __future__ import annotations

import pytest


# --- golden files (log readers) --------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite golden expected files instead of comparing against them")


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    """True when the run was started with --update-golden."""
    return bool(request.config.getoption("--update-golden"))
# --- end golden files -------------------------------------------------------------------
