"""WebDataset shards: the on-disk format (writing, opening, verifying, reading raw samples).

Format (written by ``ssd.data.convert``; contract in ARCHITECTURE.md, "Contracts"):
    DIR/shard-000000.tar ...   each sample is ``{key}.jpg`` (JPEG bytes) + ``{key}.json``:
        {"boxes": [[x1, y1, x2, y2], ...] absolute pixels, "labels": [1..C], "difficult": [..],
         "truncated": [..], "iscrowd": [..], "width", "height", "image_id", "source"}
    DIR/dataset.json           classes, source-id -> label mapping, shards with sample counts and
                               sha256, totals, problem counts, a content hash

Streaming them to training and evaluation (decode, transform, batch) is ``ssd.data.streaming``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

from ssd import storage

FORMAT_NAME = "ssd-webdataset"
FORMAT_VERSION = 1
DATASET_JSON = "dataset.json"
SHARD_PATTERN = "shard-{:06d}.tar"

#: ``s3://`` URLs are streamed in-process by ``pyarrow.fs`` (``ssd.storage``; endpoint and
#: credentials from the AWS variables, ``AWS_ENDPOINT_URL`` for MinIO). Setting this variable
#: reads them with a shell command instead (``{url}`` is replaced), e.g.
#: ``SSD_S3_COMMAND="aws s3 cp {url} -"`` or ``"mc cat {url}"``.
S3_COMMAND_ENV = "SSD_S3_COMMAND"


def _open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    if mode != "rb":
        raise ValueError(f"{url}: shards on object storage are read-only here (mode {mode!r})")
    return storage.open_input(url)


# WebDataset opens URLs through its scheme table, which has no s3 entry: ours streams the object.
wds.gopen_schemes.setdefault("s3", _open_s3)


class ShardFormatError(ValueError):
    """A dataset.json or shard that does not follow the format; the message names the file."""


# --------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Writes samples into ``shard-%06d.tar`` files, deterministically and atomically.

    A shard is closed after ``max_samples`` samples, or before a sample that would take it past
    ``max_bytes``. Tar headers carry no time or user, so the same samples give the same bytes.
    Each shard is written to a temporary name and renamed when complete.
    """

    def __init__(self, out_dir: str | Path, max_samples: int = 1000, max_bytes: int | None = None) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.out_dir = Path(out_dir)
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._current: dict[str, Any] = {}

    def write(self, key: str, jpg: bytes, meta: dict[str, Any]) -> None:
        """Append one sample; ``meta`` is the sample's JSON (see the module docstring)."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
        meta_bytes = encode_json(meta)
        size = _tar_size(len(jpg)) + _tar_size(len(meta_bytes))
        if self._tar is not None and (
            self._current["samples"] >= self.max_samples
            or (self.max_bytes is not None and tar_file_size(self._current["bytes"] + size) > self.max_bytes)
        ):
            self._close_shard()
        if self._tar is None:
            self._open_shard()
        for name, data in ((f"{key}.jpg", jpg), (f"{key}.json", meta_bytes)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o444
            info.mtime = 0
            self._tar.addfile(info, io.BytesIO(data))
        self._current["samples"] += 1
        self._current["objects"] += len(meta.get("labels", ()))
        self._current["bytes"] += size

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; returns one dict per shard (url, samples, objects, bytes, sha256)."""
        if self._tar is not None:
            self._close_shard()
        return self.shards

    def _open_shard(self) -> None:
        name = SHARD_PATTERN.format(len(self.shards))
        self._current = {"url": name, "samples": 0, "objects": 0, "bytes": 0}
        # Closed in _close_shard (a shard outlives this call, so no context manager here).
        self._file = _HashingFile(open(self.out_dir / (name + ".tmp"), "wb"))  # noqa: SIM115
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115

    def _close_shard(self) -> None:
        self._tar.close()
        self._file.close()
        name = self._current["url"]
        os.replace(self.out_dir / (name + ".tmp"), self.out_dir / name)
        self._current["bytes"] = self._file.size
        self._current["sha256"] = self._file.hexdigest()
        self.shards.append(self._current)
        self._tar = self._file = None


class _HashingFile:
    """A write-only file wrapper that hashes and counts what goes through it."""

    def __init__(self, file) -> None:
        self._file = file
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        self._file.close()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _tar_size(n: int) -> int:
    """Bytes a member of ``n`` bytes takes in a tar: a 512-byte header plus padded data."""
    return 512 + (n + 511) // 512 * 512


def tar_file_size(member_bytes: int) -> int:
    """Size of a tar file whose members take ``member_bytes``: plus the 1 KiB end marker, padded
    to whole 10 KiB records (Python's tarfile, like GNU tar, writes whole records)."""
    return -(-(member_bytes + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def encode_json(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces): the same object always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def content_hash(classes: Sequence[str], shards: Sequence[dict[str, Any]]) -> str:
    """sha256 over the class list and every shard's sha256, in order: equal hashes, equal data."""
    digest = hashlib.sha256(encode_json(list(classes)))
    for shard in shards:
        digest.update(shard["sha256"].encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Reading the index


@dataclass(frozen=True)
class ShardSet:
    """The shards of one dataset split: URLs with their sample counts, and the class names."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    classes: tuple[str, ...]
    info: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.urls) != len(self.counts):
            raise ValueError(f"{len(self.urls)} shard URLs but {len(self.counts)} counts")
        if not self.urls:
            raise ShardFormatError("a shard set needs at least one shard")

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def num_classes(self) -> int:
        """Classes including background (what ``model.num_classes`` must be)."""
        return len(self.classes) + 1

    @classmethod
    def open(cls, spec: str | os.PathLike) -> ShardSet:
        """Open a split from a directory holding ``dataset.json``, or a ``dataset.json`` path/URL.

        URLs may be ``s3://...`` (see ``S3_COMMAND_ENV``), ``http(s)://...``, or any
        WebDataset URL; shard names in dataset.json are resolved relative to its location.
        """
        spec = os.fspath(spec)
        location = spec if spec.endswith(".json") else _join(spec, DATASET_JSON)
        if _is_local(location) and not Path(location).is_file():
            raise FileNotFoundError(f"no {DATASET_JSON} at {location} (pipelines/make_shards.py writes it)")
        try:
            with wds.gopen(to_readable_url(location), "rb") as stream:
                info = json.loads(stream.read())
        except json.JSONDecodeError as err:
            raise ShardFormatError(f"{location}: not valid JSON ({err})") from err
        return cls.from_info(info, base=location.rsplit("/", 1)[0] if "/" in location else ".", where=location)

    @classmethod
    def from_info(cls, info: dict[str, Any], base: str, where: str = DATASET_JSON) -> ShardSet:
        """Build from a parsed dataset.json whose shard URLs are relative to ``base``."""
        for name in ("format", "classes", "shards"):
            if name not in info:
                raise ShardFormatError(f"{where}: missing field {name!r}")
        if info["format"] != FORMAT_NAME or info.get("version") != FORMAT_VERSION:
            raise ShardFormatError(
                f"{where}: format {info['format']!r} v{info.get('version')} is not "
                f"{FORMAT_NAME!r} v{FORMAT_VERSION}")
        try:
            urls = tuple(_join(base, shard["url"]) for shard in info["shards"])
            counts = tuple(int(shard["samples"]) for shard in info["shards"])
        except (KeyError, TypeError) as err:
            raise ShardFormatError(f"{where}: every entry of 'shards' needs 'url' and 'samples' ({err})") from err
        return cls(urls, counts, tuple(info["classes"]), info)


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def join_spec(base: str | os.PathLike, name: str) -> str:
    """``base/name`` for a folder or a URL: ``join_spec("s3://b/voc", "train")`` is
    ``"s3://b/voc/train"`` (``Path`` would collapse the ``//``)."""
    return _join(os.fspath(base), name)


def _join(base: str, name: str) -> str:
    if "://" in name or name.startswith(("/", "pipe:")):
        return name
    return storage.join(base, name)


def to_readable_url(url: str) -> str:
    """The URL WebDataset opens: ``s3://`` becomes a ``pipe:`` command when ``$SSD_S3_COMMAND``
    is set (else WebDataset streams it with ``_open_s3``); other URLs pass through."""
    command = os.environ.get(S3_COMMAND_ENV)
    if url.startswith("s3://") and command:
        # replace, not str.format: shell commands have braces of their own
        return "pipe:" + command.replace("{url}", shlex.quote(url))
    return url


def read_samples(shards: ShardSet) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """Every sample of ``shards`` in order as ``(key, jpg bytes, meta dict)``: for checks and tools."""
    for url in shards.urls:
        for sample in wds.tarfile_samples([{"url": to_readable_url(url)}]):
            yield sample["__key__"], sample["jpg"], json.loads(sample["json"])


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
