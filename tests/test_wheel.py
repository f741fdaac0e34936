"""Issue 20: `pip install .` ships the web app, and `ckpt-select ui` serves it from the install.

Built as a user builds it, offline: the sdist of a copy of the repository, the wheel from that
sdist (so a file the sdist forgets fails here too), installed with ``--no-deps --no-index`` into a
fresh venv layered on this test environment's site-packages (torch, streamlit ... come from there).
Everything then runs from a folder outside the repository with PYTHONPATH unset, so only the
installed copy can answer.
"""

from __future__ import annotations

import os
import shutil
import signal
import site
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import psutil
import pytest

from app.server import wait_healthy
from conftest import REPO, SAMPLE_RUN, write_tiny_run

# One worker builds the wheel once for the whole module (make test runs -n 2 --dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("wheel")]
pytest.importorskip("setuptools", reason="the wheel is built with this environment's setuptools (no isolation)")
# What a checkout holds besides its sources: never part of a build, and copying it costs time.
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                     ".pytest_cache", ".hypothesis", ".ckpt-select-cache", "test-artifacts",
                                     "sample_runs")


def _run(command: list[str | Path], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    """Run to completion and return stdout; a failure shows the command's own output."""
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _outside_env(tmp: Path) -> dict[str, str]:
    """This environment without PYTHONPATH (the repository must not be importable), state kept in tmp."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return env | {"CKPT_SELECT_STATE_DIR": str(tmp / "state"), "PYTHONNOUSERSITE": "1"}


def _sdist(tmp: Path, env: dict[str, str]) -> Path:
    """The sdist of a copy of the checkout (so no build/ or egg-info of the checkout can leak in)."""
    source = tmp / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES)
    build = "import sys; from setuptools.build_meta import build_sdist; build_sdist(sys.argv[1])"
    _run([sys.executable, "-c", build, tmp / "sdist"], cwd=source, env=env)
    (archive,) = (tmp / "sdist").glob("ckpt_select-*.tar.gz")
    return archive


def _wheel(sdist: Path, tmp: Path, env: dict[str, str]) -> Path:
    """The wheel pip builds from the unpacked sdist: no index, no build isolation, nothing downloaded."""
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp / "unpacked", filter="data")
    (source,) = (tmp / "unpacked").iterdir()
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation",
          "-w", tmp / "wheels", source], cwd=tmp, env=env, timeout=300)
    (wheel,) = (tmp / "wheels").glob("ckpt_select-*.whl")
    return wheel


def _venv_with_wheel(wheel: Path, tmp: Path, env: dict[str, str]) -> Path:
    """A fresh venv that sees this environment's packages after its own, with the wheel installed.

    ``--system-site-packages`` alone would add the base interpreter's site-packages, not this
    environment's when it is itself a venv, hence the .pth; ``--ignore-installed`` keeps pip from
    touching the ckpt-select this environment may already hold (e.g. an editable install).
    """
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", venv], cwd=tmp, env=env)
    python = venv / "bin" / "python"
    site_dir = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp, env).strip())
    outer = site.getsitepackages()
    (site_dir / "outer_env.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in outer))
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "--quiet", wheel],
         cwd=tmp, env=env)
    return venv


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """(venv, sdist, env): the wheel installed into a fresh venv, run from outside the repository."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = _outside_env(tmp)
    sdist = _sdist(tmp, env)
    wheel = _wheel(sdist, tmp, env)
    names = zipfile.ZipFile(wheel).namelist()
    assert {"ckpt_select_app/streamlit_app.py", "ckpt_select_app/views/run.py", "analysis/cli/__init__.py"} <= set(names)
    assert not [n for n in names if n.startswith("app/")], "the app must not install as a top-level `app`"
    return _venv_with_wheel(wheel, tmp, env), sdist, env


def test_sdist_holds_the_app_the_kernel_source_and_the_requirements(installed) -> None:
    _, sdist, _ = installed
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"app/streamlit_app.py", "app/views/merge.py", "analysis/merge/_fused.c", "requirements.txt",
            "setup.py", "MANIFEST.in"} <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".so"))]


def test_analysis_and_the_app_are_imported_from_the_venv(installed, tmp_path: Path) -> None:
    venv, _, env = installed
    probe = "import analysis, analysis.cli.app_command as c; print(analysis.__file__); print(c.app_script())"
    module, script = _run([venv / "bin" / "python", "-c", probe], tmp_path, env).splitlines()[-2:]
    # The checkout's editable install (a .pth + finder in the outer site-packages) must lose to the wheel.
    assert Path(module).is_relative_to(venv) and not Path(module).is_relative_to(REPO), module
    assert Path(script).is_relative_to(venv) and Path(script).name == "streamlit_app.py", script
    assert Path(script).parent.name == "ckpt_select_app"


def test_installed_cli_helps(installed, tmp_path: Path) -> None:
    venv, _, env = installed
    assert "ui" in _run([venv / "bin" / "ckpt-select", "--help"], tmp_path, env)
    assert "--port" in _run([venv / "bin" / "ckpt-select", "ui", "--help"], tmp_path, env)


def test_installed_app_runs_its_first_page(installed, tmp_path: Path) -> None:
    """The pages run from the installed copy (health alone runs no page): AppTest, as `streamlit run` would."""
    venv, _, env = installed
    probe = ("import sys; from analysis.cli.app_command import app_script; from streamlit.testing.v1 import AppTest\n"
             "script = app_script(); sys.path.insert(0, str(script.parent))\n"
             "at = AppTest.from_file(str(script), default_timeout=60); at.run()\n"
             "assert not at.exception, at.exception; import state; print(state.__file__); print(at.title[0].value)")
    run = write_tiny_run(tmp_path / "tiny-run", list(range(50, 650, 50)))
    state_file, title = _run([venv / "bin" / "python", "-c", probe], tmp_path,
                             env | {"CKPT_SELECT_RUN": str(run)}).splitlines()[-2:]
    assert Path(state_file).is_relative_to(venv), state_file
    assert title == "tiny-run"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_installed_ui_serves_the_sample_run(installed, tmp_path: Path) -> None:
    venv, _, env = installed
    port, log_path = _free_port(), tmp_path / "ui.log"
    command = [str(venv / "bin" / "ckpt-select"), "ui", str(SAMPLE_RUN.resolve()), "--port", str(port),
               "--address", "127.0.0.1"]
    with log_path.open("w") as log:
        # Its own session: stopping it stops `ui` and the Streamlit server it started.
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log_path, 60)
        with urllib.request.urlopen(url + "/", timeout=10) as response:
            assert response.status == 200 and b"<noscript>" in response.read()
        # `ui` execs the server (a signal to `ui` reaches Streamlit), so the process is the server itself.
        server = psutil.Process(proc.pid)
        served = [Path(arg) for arg in server.cmdline() if arg.endswith("streamlit_app.py")]
        assert len(served) == 1 and served[0].is_relative_to(venv), server.cmdline()
        assert server.children() == []
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the process group, wait, kill it if it does not go."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
