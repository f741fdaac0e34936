"""``ui``: serve the web app (Streamlit) on a run, and where its entry script is."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from ..errors import InvalidArgument
from .group import _OPTIONS, cli
from .options import PATH_OR_URL, _storage_options

APP_PACKAGE = "ckpt_select_app"  # the repository's app/ folder, as a wheel installs it (see setup.py)


def app_script() -> Path:
    """The web app's entry script: the app/ beside the analysis package in a checkout, else the installed one.

    The checkout's own app/ comes first, so a checkout run with PYTHONPATH serves its own pages
    even where another copy of the app is installed; ``pip install .`` ships app/ as ``ckpt_select_app``.
    """
    from importlib.util import find_spec

    checkout = Path(__file__).resolve().parents[2] / "app" / "streamlit_app.py"
    spec = find_spec(APP_PACKAGE)
    installed = [Path(p) / "streamlit_app.py" for p in (spec.submodule_search_locations or [])] if spec else []
    found = [script for script in (checkout, *installed) if script.is_file()]
    if not found:
        raise click.ClickException(f"the web app ({APP_PACKAGE}) is not installed: reinstall ckpt-select")
    return found[0]


@cli.command()
@click.argument("run_path", metavar="RUN", required=False, type=PATH_OR_URL)
@click.option("--root", type=PATH_OR_URL,
              help="Confine the app to this folder or URL prefix (s3://bucket/runs): runs, every file they read, "
                   "evaluators (docs/security.md).")
@click.option("--eval", "evaluators", metavar="FILE.py:FUNC", multiple=True,
              help="With --root: an evaluator the app may also run although it lies outside the root "
                   "(repeatable). An evaluator runs with the server's rights.")
@click.option("--port", type=int, default=8501, show_default=True)
@click.option("--address", help="Interface to listen on, e.g. 127.0.0.1 (default: Streamlit's, every interface).")
@click.option("--open-browser", is_flag=True,
              help="Open a browser tab (Streamlit may first ask for an e-mail on the terminal).")
@click.option("--allow-prune", is_flag=True, help="With --root: let the Storage page delete checkpoints (docs/prune.md).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where the app's similarity pass runs: this process, or tasks on a Ray cluster (docs/cluster.md).")
@click.option("--ray-address", default="auto", show_default=True, metavar="ADDRESS",
              help="--executor ray: the cluster (auto, local, or HOST:PORT).")
@click.option("--eval-gpus", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="--executor ray: GPUs each of the Merge page's evaluations asks the cluster for.")
@_storage_options
def ui(run_path: Path | None, root: Path | None, evaluators: tuple[str, ...], port: int, address: str | None,
       open_browser: bool, allow_prune: bool, executor: str, ray_address: str, eval_gpus: float = 0.0) -> None:
    """Serve the web app (Streamlit) on RUN.

    Headless unless --open-browser: nothing is asked on the terminal, so it also runs from
    scripts, services and SSH sessions; the address to open is printed.
    """
    from ..evaluate import canonical_evaluator_spec, evaluator_file
    env = dict(os.environ)
    if run_path is not None:
        env["CKPT_SELECT_RUN"] = _absolute_text(run_path)
    if root is not None:
        env["CKPT_SELECT_ROOT"] = _absolute_text(root)
    allowed = [canonical_evaluator_spec(spec) for spec in evaluators]
    missing = next((spec for spec in allowed if not evaluator_file(spec).is_file()), None)
    if missing is not None:
        raise InvalidArgument(f"ui --eval {missing}: no such file")
    env["CKPT_SELECT_EVALUATORS"] = json.dumps(allowed)
    if _OPTIONS.get("storage_options"):   # in the server's environment only, never on its command line
        env["CKPT_SELECT_STORAGE_OPTIONS"] = _OPTIONS["storage_options"]
    env.pop("CKPT_SELECT_EXECUTOR", None)
    env.pop("CKPT_SELECT_EVAL_GPUS", None)
    if executor == "ray":   # the server joins the cluster itself; this process only hands it the address
        env["CKPT_SELECT_EXECUTOR"] = f"ray@{ray_address}"
        env["CKPT_SELECT_EVAL_GPUS"] = f"{eval_gpus:g}"
    env.pop("CKPT_SELECT_ALLOW_PRUNE", None)   # only this flag allows it, never an inherited variable
    if allow_prune:
        env["CKPT_SELECT_ALLOW_PRUNE"] = "1"
    click.echo(f"Serving CkptSelect at http://{address or 'localhost'}:{port}", err=True)
    command = _streamlit_command(port, address, open_browser)
    # The server replaces this process, so a signal sent to `ckpt-select ui` (kill, a service
    # manager's stop) reaches Streamlit itself instead of leaving it running as an orphan.
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)


def _absolute_text(path: "Path | str") -> str:
    """A local path resolved, or a URL as given (what the app is told to open or confine itself to)."""
    return str(path.expanduser().resolve()) if isinstance(path, Path) else str(path)


def _streamlit_command(port: int, address: str | None, open_browser: bool) -> list[str]:
    """``streamlit run`` on the app with the server flags ``ui`` was given."""
    command = [sys.executable, "-m", "streamlit", "run", str(app_script()), "--server.port", str(port),
               "--server.headless", str(not open_browser).lower(), "--browser.gatherUsageStats", "false"]
    return command + ["--server.address", address] if address else command
