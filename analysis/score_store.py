"""Evaluator scores kept on disk (``recommend --eval-cache``), so a search that died resumes for free.

An evaluator call on a large model can take minutes, and a search makes dozens. With the cache on,
every score is written as soon as it is known, under two keys that say exactly what was scored:

- the evaluator's identity: the sha256 of its source file (or, for ``hf-lm``, of the text, the
  config and the tokenizer files, with the token budget and the device), the function's name, and
  the score's direction;
- the candidate: each checkpoint's files (resolved path, size, modification time), its weight, and
  the output dtype.

Change the evaluator file, retrain over a checkpoint, or ask for another dtype, and the old score is
simply not found. What the key cannot see is data the evaluator reads on its own (a validation
file next to it): that is why the cache is opt-in for a user's evaluator. A cache file that cannot be
read is started afresh, one that cannot be written only costs the speed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from .remote import RemotePath, file_look

if TYPE_CHECKING:
    from .run import CheckpointRef

VERSION = 1


def scores_dir() -> Path:
    """``CKPT_SELECT_SCORES_DIR``, or ~/.cache/ckpt-select/scores (beside the sketch cache)."""
    base = os.environ.get("CKPT_SELECT_SCORES_DIR")
    return Path(base) if base else Path.home() / ".cache" / "ckpt-select" / "scores"


def file_digest(paths: Iterable[Path]) -> str:
    """sha256 over the names and bytes of ``paths`` (small files: sources, configs, tokenizers, texts)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def candidate_key(refs: Sequence[CheckpointRef], weights: Sequence[float], output_dtype: str) -> str:
    """The candidate average's identity as one string: dtype, and each input's files and weight."""
    members = []
    for ref, weight in zip(refs, weights):
        if weight > 0:
            files = [list(file_look(f)) if isinstance(f, RemotePath) else   # an object: URL, size, ETag (issue 22)
                     [str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in ref.files]
            members.append([str(ref.path.resolve()), files, round(float(weight), 10)])
    return json.dumps([output_dtype, members], separators=(",", ":"))


class ScoreStore:
    """One evaluator's scores in ``scores_dir()/<identity>.json``."""

    def __init__(self, identity: str, folder: Path | None = None) -> None:
        self.path = (folder or scores_dir()) / f"{hashlib.sha256(f'v{VERSION}|{identity}'.encode()).hexdigest()[:32]}.json"
        self._scores = self._load()

    def _load(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        scores = data.get("scores") if isinstance(data, dict) else None
        if not isinstance(scores, dict):
            return {}
        return {k: float(v) for k, v in scores.items() if isinstance(k, str) and isinstance(v, (int, float))}

    def get(self, key: str) -> float | None:
        """The stored score of a candidate, or None."""
        return self._scores.get(key)

    def put(self, key: str, score: float) -> None:
        """Store a score and write the file at once (atomically: a reader never sees half a file)."""
        self._scores[key] = score
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"version": VERSION, "scores": self._scores}))
            tmp.replace(self.path)
        except OSError:
            pass

    def __len__(self) -> int:
        return len(self._scores)
