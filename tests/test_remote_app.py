"""The web app on a run in object storage (issue 22): opened by URL, and ``ui --root s3://bucket/prefix``.

Streamlit's AppTest runs the real app script in this process, against moto's S3 server on 127.0.0.1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from conftest import REPO, upload_tree, write_tiny_run

APP = str(REPO / "app" / "streamlit_app.py")


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recent runs are remembered on disk: keep each test's memory to itself."""
    monkeypatch.setenv("CKPT_SELECT_STATE_DIR", str(tmp_path / "state"))


def _open(run: str, monkeypatch: pytest.MonkeyPatch, root: str | None = None) -> AppTest:
    monkeypatch.setenv("CKPT_SELECT_RUN", run)
    if root is None:
        monkeypatch.delenv("CKPT_SELECT_ROOT", raising=False)
    else:
        monkeypatch.setenv("CKPT_SELECT_ROOT", root)
    at = AppTest.from_file(APP, default_timeout=90)
    at.run()
    assert not at.exception, at.exception
    return at


def test_app_opens_an_s3_run_by_url(tmp_path, s3_server, s3_bucket, monkeypatch) -> None:
    """issue 22: the Run and Checkpoints pages of a run read straight from the bucket."""
    run = write_tiny_run(tmp_path / "run", [50, 100, 150, 200])
    url = upload_tree(run, s3_server.endpoint, s3_bucket, "runs/tiny")
    from analysis.remote import set_storage_options
    set_storage_options(None)   # the server process gets them from `ui --storage-options`, in its environment
    monkeypatch.setenv("CKPT_SELECT_STORAGE_OPTIONS", json.dumps(
        {"s3": {"endpoint_url": s3_server.endpoint, "key": "testing", "secret": "testing"}}))
    at = _open(url, monkeypatch)
    assert at.title[0].value == "tiny"
    assert any(url in c.value for c in at.caption)   # "Open: `s3://...`" in the sidebar
    at.switch_page("views/checkpoints.py").run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert sorted(table["step"].tolist()) == [50, 100, 150, 200]
    assert s3_server.counts.gets > 0


def test_the_app_applies_its_storage_options_again_once_something_reset_them(tmp_path, s3_server, s3_bucket,
                                                                           monkeypatch) -> None:
    """issue 22: the options from `ui --storage-options` are compared with those in force on each run of the
    script, not with what the app applied before: in one process (tests, an embedding) someone else may reset
    them, and the app then listed the run against AWS itself (a DNS failure) instead of the endpoint given."""
    from analysis.remote import set_storage_options
    from analysis.remote.urls import current_storage_options

    url = upload_tree(write_tiny_run(tmp_path / "run", [50, 100]), s3_server.endpoint, s3_bucket, "runs/tiny")
    options = {"s3": {"endpoint_url": s3_server.endpoint, "key": "testing", "secret": "testing"}}
    monkeypatch.setenv("CKPT_SELECT_STORAGE_OPTIONS", json.dumps(options))
    for _ in range(2):
        set_storage_options(None)   # the process's options, reset by someone else between the two app sessions
        at = _open(url, monkeypatch)
        assert at.title[0].value == "tiny" and current_storage_options() == options


def test_root_url_prefix_confines_the_app(tmp_path, s3_server, s3_bucket, monkeypatch) -> None:
    """issue 22: with --root s3://bucket/runs a run under it opens, a sibling prefix is refused, and
    the run picker offers the runs under the prefix."""
    run = write_tiny_run(tmp_path / "run", [50, 100])
    inside = upload_tree(run, s3_server.endpoint, s3_bucket, "runs/a")
    outside = upload_tree(run, s3_server.endpoint, s3_bucket, "runs2/a")
    root = f"s3://{s3_bucket}/runs"
    at = _open(inside, monkeypatch, root=root)
    assert at.title[0].value == "a"
    assert inside in at.selectbox(key="run_choice").options
    refused = _open(outside, monkeypatch, root=root)
    assert any("outside the allowed prefix" in e.value for e in refused.error)
    sneaky = _open(f"{root}/../runs2/a", monkeypatch, root=root)
    assert any("outside the allowed prefix" in e.value for e in sneaky.error)


def test_ui_hands_a_url_root_and_the_storage_options_to_the_server_only_in_its_environment(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """issue 22: `ui --root s3://...` keeps the URL (click.Path would make it s3:/...); the options travel in the
    server's environment, never on its command line or in the output."""
    import os

    from analysis.cli import main
    from analysis.remote import set_storage_options

    seen: list[tuple[list[str], dict]] = []
    monkeypatch.setattr(os, "execve", lambda path, args, env: seen.append((args, env)))
    options = '{"s3": {"endpoint_url": "http://127.0.0.1:9", "secret": "hush-hush"}}'
    try:
        assert main(["--storage-options", options, "ui", "s3://bucket/runs/a", "--root", "s3://bucket/runs"]) == 0
    finally:
        set_storage_options(None)
    args, env = seen[0]
    assert env["CKPT_SELECT_ROOT"] == "s3://bucket/runs" and env["CKPT_SELECT_RUN"] == "s3://bucket/runs/a"
    assert env["CKPT_SELECT_STORAGE_OPTIONS"] == options
    out, err = capsys.readouterr()
    assert "hush-hush" not in " ".join(args) + out + err
