"""The sha256 of a merge's inputs as work units, one per file, for a merge run on an executor (issue 22).

The local merge hashes its inputs from its own read pass (:class:`analysis.merge.read.ReadHashes`), so
``--sha256`` and ``--verify full`` cost no second read there. A cluster merge has no single read pass:
each unit reads its own group of tensors, from every input. So the files are hashed by units of their
own, one per file (sha256 is sequential within a file, so a file is the natural unit), spread over the
cluster like the merge's units: the hashes of N inputs take about the time of the largest one, not N
times it, and the driver reads nothing. The result is the file's ``sha256sum`` and the same quick-hash
samples the read pass keeps, so a recipe written by a cluster merge equals the local merge's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..executors import Executor, Resources
from ..hashing import StreamDigest
from ..remote import as_path
from .distributed import task_progress

Progress = Callable[[float, str], None]
# A unit holds one 8 MiB read chunk; Ray's reservation adds the interpreter's ~150 MB (measured for merge units).
_UNIT_MEMORY = 200 << 20


@dataclass(frozen=True, slots=True)
class HashUnit:
    """One input file to hash: a local path (on storage every node reaches) or a URL."""

    path: str


@dataclass(frozen=True, slots=True)
class HashResult:
    """A file's sha256 and quick-hash samples: small, sent back to the driver."""

    path: str
    sha256: str
    size_bytes: int
    samples: tuple[bytes, ...]     # the quick hash's sampled blocks (about 2 MiB per file)

    @property
    def bytes_read(self) -> int:
        """Every byte of the file (what the executor's progress counts)."""
        return self.size_bytes


def hash_unit(unit: HashUnit) -> HashResult:
    """Read one file whole, in order, and hash it (the work unit; pure, retryable)."""
    sha256, (size, samples) = StreamDigest(as_path(unit.path)).finish()
    return HashResult(unit.path, sha256, size, tuple(samples))


def hash_files(executor: Executor, files: Sequence[Path], progress: Progress | None = None
               ) -> dict[Path, tuple[str, tuple[int, list[bytes]]]]:
    """Every file's (sha256, quick-hash samples), hashed by ``executor`` in units of one file, largest first.

    The value has the shape :meth:`analysis.merge.read.ReadHashes.finish` returns, so the engine records
    cluster hashes exactly as it records the read pass's.
    """
    by_name = {str(f): f for f in files}
    units = [HashUnit(name) for name in sorted(by_name, key=lambda n: -by_name[n].stat().st_size)]
    digests = {}
    counted = task_progress(progress, "sha256: {done}/{total} files")
    for result in executor.map(hash_unit, units, Resources(memory=_UNIT_MEMORY), counted):
        digests[by_name[result.path]] = (result.sha256, (result.size_bytes, list(result.samples)))
    return digests


def sha256_of(executor: Executor) -> Callable[[Sequence[Path]], dict[Path, str]]:
    """A ``files -> {file: sha256}`` function that hashes on ``executor`` (what ``--verify full`` uses there)."""
    return lambda files: {f: digest for f, (digest, _) in hash_files(executor, files).items()}
