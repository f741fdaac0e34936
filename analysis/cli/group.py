"""The ``ckpt-select`` click group: global options (``--verbose``, ``--storage-options``), shared with
the commands through ``_OPTIONS``, and the quieting of other libraries' chatter."""

from __future__ import annotations

import logging
import warnings

import click

from .. import __version__

# Global options the entry point needs after the command returns (set by the group's callback).
_OPTIONS: dict = {"verbose": False, "io_before": {}}
STORAGE_OPTIONS_HELP = ('Options for object storage URLs (s3://, gs://, hf://...), e.g. \'{"s3": {"endpoint_url": '
                        '"http://minio:9000"}}\'; credentials otherwise come from the environment (docs/remote-runs.md).')


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckpt-select")
@click.option("--verbose", is_flag=True, help="Show library warnings (torch, transformers) and, on an error, its cause.")
@click.option("--storage-options", metavar="JSON", help=STORAGE_OPTIONS_HELP)
def cli(verbose: bool, storage_options: str | None = None) -> None:
    """CkptSelect: which checkpoints of a training run to average, why, and the merge."""
    _OPTIONS["verbose"] = verbose
    _OPTIONS["storage_options"] = None
    apply_storage_options(storage_options)
    if not verbose:
        _quiet_libraries()


def apply_storage_options(text: str | None) -> None:
    """Use ``--storage-options`` (given before or after the command name) for every URL of this command.

    Never echoed: it may hold secrets. ``ui`` hands it to its server process in the environment only.
    """
    if text is None:
        return
    from ..remote import set_storage_options
    set_storage_options(text)
    _OPTIONS["io_before"] = {}
    _OPTIONS["storage_options"] = text


def _quiet_libraries() -> None:
    """Keep other libraries' chatter off stderr, where a one-line error must stay one line (issue 19).

    torch and NumPy warn through ``warnings`` (e.g. on ``torch.load``), transformers and
    huggingface_hub through ``logging`` (model building); ``--verbose`` shows both. ``main``
    restores both settings when the command returns.
    """
    warnings.simplefilter("ignore")
    warnings.filterwarnings("default", module=r"analysis(\.|$)")   # CkptSelect's own warnings still show
    logging.disable(logging.WARNING)
