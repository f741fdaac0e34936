"""``RemotePath``: the part of ``pathlib.Path`` the readers use, over a store and one listing per prefix.

Why a path-like object: run discovery, the log readers and the checkpoint readers were written
against ``Path`` (``exists``, ``is_dir``, ``iterdir``, ``glob``, ``stat``, ``open``). A
``RemotePath`` answers the questions about names and sizes from a listing of the run's prefix,
made once (object stores have no folders: a "folder" is a key prefix), and reads bytes through
:class:`RangedFile`, which fetches exact ranges. It has no ``__fspath__`` on purpose: code that
would hand it to ``os.open`` or a memory map fails loudly instead of opening a local file with
a URL for a name.
"""

from __future__ import annotations

import fnmatch
import io
import posixpath
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterator, Sequence

from ..errors import RemoteError
from .store import Store
from .urls import store_for

# The first request of a ranged read fetches at least this many bytes, so a safetensors header
# (8-byte length + JSON) usually costs one request and never more than two (issue 22).
FIRST_READ_BYTES = 100_000
# Objects no larger than the first read are kept whole once fetched (by URL, size and ETag), up to this
# many bytes in all: a log, a trainer_state.json or a config.json is sniffed, then read, then parsed
# by several readers, and each look would otherwise cost a request.
SMALL_OBJECTS_BYTES = 16 << 20
_small_objects: "OrderedDict[tuple[str, int, str | None], bytes]" = OrderedDict()
_small_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class RemoteStat:
    """What ``Path.stat()`` tells the readers: size and time, plus the object's ETag for recipes."""

    st_size: int
    st_mtime: float
    etag: str | None


def object_version(entry: dict) -> str | None:
    """What changes when an object is rewritten: its ETag (S3's ``ETag``, GCS's ``etag``), else GCS's generation.

    Why the ETag first: S3 has no generation, and GCS's JSON API ETag changes with the generation.
    """
    tag = str(entry.get("ETag") or entry.get("etag") or "").strip('"')
    return tag or (f"generation:{entry['generation']}" if entry.get("generation") else None)


class Listing:
    """The objects known below some prefixes of one store, from one listing each."""

    def __init__(self) -> None:
        self._prefixes: dict[str, dict[str, dict]] = {}

    def covered(self, path: str) -> dict[str, dict] | None:
        """The listing of the longest listed prefix holding ``path``, or None when none does."""
        best = None
        for prefix, objects in self._prefixes.items():
            if (path == prefix or path.startswith(prefix + "/")) and (best is None or len(prefix) > len(best)):
                best = prefix
        return self._prefixes[best] if best is not None else None

    def add(self, prefix: str, objects: dict[str, dict]) -> None:
        self._prefixes[prefix] = objects

    def forget(self, prefix: str) -> None:
        """Drop listings at, below or above ``prefix``: a live run is listed again on the next look, and an
        object we just wrote is not missing from a listing of its parent made before it existed."""
        for key in [k for k in self._prefixes
                    if k == prefix or k.startswith(prefix + "/") or prefix.startswith(k + "/") or not k]:
            del self._prefixes[key]


_listings: dict[int, Listing] = {}


def listing_of(store: Store) -> Listing:
    """The listing cache of one store (kept as long as the store)."""
    return _listings.setdefault(id(store), Listing())


class RemotePath:
    """A file or "folder" (key prefix) in object storage, used where the readers use a ``Path``."""

    __slots__ = ("store", "key")

    def __init__(self, url: str, *, store: Store | None = None, key: str | None = None) -> None:
        if store is None or key is None:
            store, key = store_for(str(url))
        self.store, self.key = store, key.rstrip("/")

    # --- names -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.store.url(self.key)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __reduce__(self) -> tuple:
        """Pickled as its URL (caches pickle runs): unpickled onto this process's store for the protocol."""
        return (RemotePath, (self.url,))

    def as_posix(self) -> str:
        """The URL (what sorting and messages use where a local path gives its POSIX form)."""
        return self.url

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: "RemotePath") -> bool:
        return self.url < str(other)

    def __truediv__(self, part: str) -> "RemotePath":
        return self._at(posixpath.join(self.key, str(part)))

    def joinpath(self, *parts: str) -> "RemotePath":
        result = self
        for part in parts:
            result = result / part
        return result

    def _at(self, key: str) -> "RemotePath":
        return RemotePath(self.url, store=self.store, key=posixpath.normpath(key))

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def suffixes(self) -> list[str]:
        return PurePosixPath(self.name).suffixes

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def parent(self) -> "RemotePath":
        parent = posixpath.dirname(self.key)
        return self._at(parent) if parent else self

    @property
    def parents(self) -> list["RemotePath"]:
        result, current = [], self
        while current.parent != current:
            current = current.parent
            result.append(current)
        return result

    @property
    def parts(self) -> tuple[str, ...]:
        return (f"{self.store.protocol}://", *self.key.split("/"))

    def with_name(self, name: str) -> "RemotePath":
        return self.parent / name

    def with_suffix(self, suffix: str) -> "RemotePath":
        return self.parent / (self.stem + suffix)

    def is_absolute(self) -> bool:
        return True

    def resolve(self, strict: bool = False) -> "RemotePath":
        return self

    def expanduser(self) -> "RemotePath":
        return self

    def absolute(self) -> "RemotePath":
        return self

    def is_relative_to(self, other: object) -> bool:
        other_key = other.key if isinstance(other, RemotePath) and other.store is self.store else None
        return other_key is not None and (self.key == other_key or self.key.startswith(other_key + "/"))

    def relative_to(self, other: "RemotePath") -> PurePosixPath:
        if not self.is_relative_to(other):
            raise ValueError(f"{self} is not below {other}")
        return PurePosixPath(self.key[len(other.key):].lstrip("/") or ".")

    # --- what is there (from the listing) ------------------------------------------------------
    def list(self) -> dict[str, dict]:
        """Every object below this prefix, listed once and cached: what discovery walks."""
        listing = listing_of(self.store)
        objects = listing.covered(self.key)
        if objects is None:
            objects = self.store.list_prefix(self.key)
            listing.add(self.key, objects)
        prefix = self.key + "/"
        return {k: v for k, v in objects.items() if k.startswith(prefix) or k == self.key}

    def refresh(self) -> None:
        """Forget the cached listing at and below this prefix (a live run may have new objects)."""
        listing_of(self.store).forget(self.key)

    def relist(self) -> dict[str, dict]:
        """List this prefix anew (one request) and answer every later question below it from that listing.

        Unlike :meth:`refresh`, a listing of a parent prefix made earlier cannot answer for it afterwards.
        """
        listing = listing_of(self.store)
        listing.forget(self.key)
        listing.add(self.key, self.store.list_prefix(self.key))
        return self.list()

    def _entry(self) -> dict | None:
        """This object's listing entry (None: not an object), listing the parent prefix if nothing covers it."""
        objects = listing_of(self.store).covered(self.key)
        if objects is None:
            objects = self.parent.list() if self.parent != self else self.list()
        return objects.get(self.key)

    def is_file(self) -> bool:
        return self._entry() is not None

    def is_dir(self) -> bool:
        objects = listing_of(self.store).covered(self.key)
        if objects is None:
            objects = self.list()
        prefix = self.key + "/"
        return any(k.startswith(prefix) for k in objects)

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def is_symlink(self) -> bool:
        """Always False: object stores have no links (what ``ui --root`` checks a local file for)."""
        return False

    def iterdir(self) -> Iterator["RemotePath"]:
        """Direct children: objects and "folders" (distinct next key parts)."""
        prefix, seen = self.key + "/", set()
        for key in sorted(self.list()):
            if key.startswith(prefix):
                child = key[len(prefix):].split("/", 1)[0]
                if child not in seen:
                    seen.add(child)
                    yield self / child

    def walk(self) -> Iterator[tuple["RemotePath", list[str], list[str]]]:
        """``os.walk`` over the listing, top-down: (folder, child folder names, file names)."""
        tree: dict[str, tuple[set[str], set[str]]] = {}
        for key in self.list():
            parts = key[len(self.key) + 1:].split("/")
            for depth in range(len(parts)):
                folder = "/".join(parts[:depth])
                dirs, files = tree.setdefault(folder, (set(), set()))
                (files if depth == len(parts) - 1 else dirs).add(parts[depth])
        stack = [""]
        while stack:
            folder = stack.pop()
            dirs, files = tree.get(folder, (set(), set()))
            names = sorted(dirs)
            yield (self / folder if folder else self), names, sorted(files)
            stack.extend(reversed([f"{folder}/{d}" if folder else d for d in names]))

    def glob(self, pattern: str) -> Iterator["RemotePath"]:
        """Children matching ``pattern`` (``**/`` patterns match at any depth), as ``Path.glob``."""
        if pattern.startswith("**/"):
            yield from self.rglob(pattern[3:])
            return
        for child in self.iterdir():
            if fnmatch.fnmatchcase(child.name, pattern):
                yield child

    def rglob(self, pattern: str) -> Iterator["RemotePath"]:
        prefix = self.key + "/"
        found = {self._at(k) for k in self.list() if k.startswith(prefix) and fnmatch.fnmatchcase(posixpath.basename(k), pattern)}
        yield from sorted(found)

    def stat(self) -> RemoteStat:
        """Size, time and ETag from the listing (no request when the prefix was listed)."""
        entry = self._entry()
        if entry is None:
            raise RemoteError(self.url, "no such object")
        mtime = entry.get("LastModified") or entry.get("mtime") or entry.get("created") or 0
        return RemoteStat(int(entry.get("size") or 0), getattr(mtime, "timestamp", lambda: float(mtime))(),
                          object_version(entry))

    # --- bytes -----------------------------------------------------------------------------------
    def open(self, mode: str = "rb", *args: object, **kwargs: object) -> io.IOBase:
        """A read-only binary file reading exact ranges (:class:`RangedFile`): a small file costs one request."""
        if mode not in ("rb", "r"):
            raise RemoteError(self.url, f"opened with mode {mode!r}: remote inputs are read-only")
        stat = self.stat()
        raw = RangedFile(self, stat.st_size, (self.url, stat.st_size, stat.etag))
        return raw if mode == "rb" else io.TextIOWrapper(raw, encoding=kwargs.get("encoding") or "utf-8",  # type: ignore[arg-type]
                                                         errors=kwargs.get("errors") or "strict")  # type: ignore[arg-type]

    def read_bytes(self) -> bytes:
        with self.open("rb") as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` in one exact request."""
        return self.store.read_range(self.key, start, end)


class RangeView(io.RawIOBase):
    """A seekable read-only file over an object of ``size`` bytes whose reads :meth:`_bytes` answers.

    What torch's and Python's zip readers, ``json`` and the log readers need of a file; subclasses
    decide where each ``[start, end)`` comes from (a kept head, an exact ranged request).
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self._size, self._pos = size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: memoryview) -> int:   # type: ignore[override]
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        if end <= self._pos:
            return b""
        data = self._bytes(self._pos, end)
        self._pos = end
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def _bytes(self, start: int, end: int) -> bytes:
        raise NotImplementedError


class RangedFile(RangeView):
    """A view of a large object: each read is one exact range, no read-ahead cache.

    The first read fetches at least :data:`FIRST_READ_BYTES` and keeps them, so that a header
    read as "8 bytes, then N bytes" costs one request when it is short and two when it is long.
    """

    def __init__(self, path: RemotePath, size: int, identity: tuple[str, int, str | None] | None = None) -> None:
        super().__init__(size)
        self._path = path
        self._identity = identity if size <= FIRST_READ_BYTES else None
        self._head: bytes | None = _small_objects.get(self._identity) if self._identity else None

    def _bytes(self, start: int, end: int) -> bytes:
        if self._head is None and start == 0:
            self._head = self._path.read_range(0, min(self._size, max(end, FIRST_READ_BYTES)))
            _keep_small(self._identity, self._head)
        if self._head is not None and end <= len(self._head):
            return self._head[start:end]
        if self._head is not None and start < len(self._head):
            return self._head[start:] + self._path.read_range(len(self._head), end)
        return self._path.read_range(start, end)


def _keep_small(identity: tuple[str, int, str | None] | None, data: bytes) -> None:
    """Remember a whole small object (see SMALL_OBJECTS_BYTES), forgetting the oldest past the bound."""
    if identity is None or len(data) != identity[1]:
        return
    with _small_lock:
        _small_objects[identity] = data
        while sum(len(v) for v in _small_objects.values()) > SMALL_OBJECTS_BYTES:
            _small_objects.popitem(last=False)


def read_path_spans(spans: "Sequence[tuple[RemotePath, int, int]]", part_bytes: int) -> list[bytes]:
    """The bytes of each ``(object, start, end)`` span, in requests of at most ``part_bytes``, every part of
    every span of a store in ONE concurrent batch (:meth:`Store.read_spans`), so a set of spans costs about
    the slowest request, not the sum: what the merge's and the sketch pass's read-ahead both need."""
    by_store: dict[int, list[tuple[int, RemotePath, int, int]]] = {}
    for number, (path, start, end) in enumerate(spans):
        parts = by_store.setdefault(id(path.store), [])
        parts.extend((number, path, s, min(s + part_bytes, end)) for s in range(start, end, part_bytes))
    pieces: list[list[bytes]] = [[] for _ in spans]
    for parts in by_store.values():
        blobs = parts[0][1].store.read_spans([(path.key, s, e) for _, path, s, e in parts])
        for (number, _, _, _), blob in zip(parts, blobs):
            pieces[number].append(blob)
    return [b"".join(p) for p in pieces]
