"""Whether a merge output in object storage is complete: the commit-marker rule readers apply (issue 22).

Object stores have no rename, so a merge to ``s3://b/merged`` cannot appear all at once the way a
local merge's folder does. It writes every shard first, then the index, then ``recipe.yaml`` as
the last object: the recipe is the commit marker. A prefix whose recipe is missing, or whose index
names a shard that is missing or of another size than the index records, is a merge that was
killed (or is still running): :func:`incomplete_output` says so in one sentence, from one listing
and one small read of the index, so run discovery can pass it over with that note.

Here, under :mod:`analysis.remote` and free of the merge engine, so that run discovery
(:mod:`analysis.run`) and the checkpoint readers can call it without importing the merge.
"""

from __future__ import annotations

import json
import re
import struct

from ..errors import RemoteError
from .path import RemotePath

# The names the merge writes (analysis.merge.output uses the same): the index and the commit marker.
INDEX_FILE = "model.safetensors.index.json"
RECIPE_FILE = "recipe.yaml"
# The key of the index's metadata under which a merge records each shard's size in bytes.
SHARD_BYTES_KEY = "ckpt_select_shard_bytes"
# The key a merge's weights carry in their safetensors header metadata (analysis.run.MERGE_MARKER_KEY).
MERGE_MARKER_KEY = "ckpt_select_recipe_sha256"
# The safetensors format caps a header at 100 MB.
HEADER_LIMIT = 100_000_000
# The weights a merge writes (analysis.merge.output): one model.safetensors, or model-0000i-of-0000n.safetensors shards.
_MERGE_WEIGHTS = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


def merge_output_prefix(path: RemotePath) -> RemotePath | None:
    """The prefix a merge wrote ``path`` into, judged by names alone; None when ``path`` is not named as a merge names it.

    What discovery asks of a checkpoint whose weights carry :data:`MERGE_MARKER_KEY` before calling
    :func:`incomplete_output`: a merge output's index or weights (``model.safetensors``,
    ``model-00001-of-00016.safetensors``) or a folder (an HF folder, the merge copied its
    ``config.json``) stand for their prefix; a merge's weights copied into a run under another
    name (``merged.safetensors``, beside the run's own files) are no merge output and never "incomplete".
    """
    if path.name == INDEX_FILE or _MERGE_WEIGHTS.match(path.name):
        return path.parent
    return path if path.is_dir() else None


def incomplete_output(prefix: RemotePath, index_doc: dict | None = None) -> str | None:
    """None when ``prefix`` holds a complete merge output (or is no merge output); else why it is incomplete.

    Complete: ``recipe.yaml`` present and, when an index is present, every shard it names present
    with the size it records. A prefix without the recipe counts as a merge output being written or
    killed when it holds weights carrying the merge marker or an index written by a merge.
    ``index_doc``: the index's parsed JSON when the caller has read it (saves its request).

    Where discovery calls it: for a remote HF or sharded folder whose index metadata carries
    :data:`MERGE_MARKER_KEY` (a merge's output), so an ordinary checkpoint costs no request.
    """
    objects = {key.rsplit("/", 1)[-1]: info for key, info in prefix.list().items()
               if key.rsplit("/", 1)[0] == prefix.key}
    index = _merge_index(index_doc) if index_doc is not None else _index(prefix, objects)
    if RECIPE_FILE not in objects:
        if index is None and not _holds_merge_weights(prefix, objects):
            return None
        return (f"{prefix}: an incomplete merge output (no {RECIPE_FILE}, which a merge writes last): the merge "
                "was killed or is still running; merge again with --force to replace it")
    if index is None:
        return None
    return _missing_shards(prefix, objects, index)


def _index(prefix: RemotePath, objects: dict[str, dict]) -> dict | None:
    """The merge index's document, when the prefix holds one written by a merge."""
    if INDEX_FILE not in objects:
        return None
    try:
        doc = json.loads((prefix / INDEX_FILE).read_bytes())
    except (ValueError, RemoteError):
        return None
    return _merge_index(doc)


def _merge_index(doc: object) -> dict | None:
    """The index document when a merge wrote it (its metadata carries the merge marker), else None."""
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    return doc if isinstance(meta, dict) and MERGE_MARKER_KEY in meta else None


def _holds_merge_weights(prefix: RemotePath, objects: dict[str, dict]) -> bool:
    """Whether the first ``.safetensors`` object under the prefix carries the merge marker."""
    weights = sorted(name for name in objects if name.endswith(".safetensors"))
    return bool(weights) and carries_merge_marker(prefix / weights[0])


def carries_merge_marker(path: RemotePath) -> bool:
    """Whether a remote safetensors object's header metadata holds the merge marker (one or two ranged reads)."""
    try:
        with path.open("rb") as f:
            length = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(length)) if length < HEADER_LIMIT else {}
    except (ValueError, struct.error, RemoteError):   # an unreadable shard is no evidence either way
        return False
    return MERGE_MARKER_KEY in (header.get("__metadata__") or {})


def _missing_shards(prefix: RemotePath, objects: dict[str, dict], index: dict) -> str | None:
    """A sentence naming the shards the index names that are absent or of another size, or None."""
    sizes = index["metadata"].get(SHARD_BYTES_KEY) or {}
    names = sorted(set((index.get("weight_map") or {}).values()) | set(sizes))
    bad = [name for name in names if name not in objects
           or (name in sizes and int(objects[name].get("size") or 0) != int(sizes[name]))]
    if not bad:
        return None
    more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
    return (f"{prefix}: an incomplete merge output: shard {bad[0]}{more} named by the index is missing or "
            "of the wrong size")
