"""Files at a local path or at an object-store URI (``s3://bucket/key``, ``gs://``, ``hdfs://``).

Runs, sweeps and shards may live on object storage (``--storage-path s3://...``). The few files
the pipelines read or write themselves (a sweep's setup, a checkpoint's ``meta.json``, a trial's
placement-group id, shards) go through these functions, so one code path serves both. URIs are
opened with ``pyarrow.fs``, the filesystem layer Ray Train uses for the same ``storage_path``:
credentials, region and endpoint come from the usual AWS variables (``AWS_ENDPOINT_URL`` for
MinIO or another S3-compatible store).

Local writes are atomic (a temporary sibling renamed into place); object-store writes are
atomic by nature (an object appears whole when its upload completes).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import IO, Any


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (object storage), False for a local path."""
    return "://" in os.fspath(location)


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` for a path or a URI (``Path`` would collapse ``s3://`` into ``s3:/``)."""
    base = os.fspath(base)
    if not is_uri(base):
        return str(Path(base, *parts))
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


@cache
def _filesystem(root: str, pid: int, endpoint: str | None) -> Any:
    # One client per bucket and process: creating one can cost a region lookup, and an S3 client
    # must not cross a fork (DataLoader workers), hence the pid in the key; the endpoint is read
    # from the environment when the client is made, hence it too.
    from pyarrow import fs as pafs

    filesystem, _ = pafs.FileSystem.from_uri(root)
    return filesystem


def _resolve(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) of a URI."""
    scheme, rest = uri.split("://", 1)
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise ValueError(f"{uri}: no bucket in the URI")
    return _filesystem(f"{scheme}://{bucket}", os.getpid(), os.environ.get("AWS_ENDPOINT_URL")), rest.rstrip("/")


def _not_found(location: str, err: BaseException | None = None) -> FileNotFoundError:
    error = FileNotFoundError(f"no file at {location}")
    error.__cause__ = err
    return error


def open_input(location: str | os.PathLike) -> IO[bytes]:
    """A binary stream reading the file at ``location`` (caller closes it)."""
    location = os.fspath(location)
    if not is_uri(location):
        return open(location, "rb")
    filesystem, path = _resolve(location)
    try:
        return filesystem.open_input_stream(path)
    except FileNotFoundError as err:
        raise _not_found(location, err) from None


def read_bytes(location: str | os.PathLike) -> bytes:
    """The whole file; ``FileNotFoundError`` naming ``location`` when there is none."""
    location = os.fspath(location)
    if not is_uri(location):
        return Path(location).read_bytes()
    with open_input(location) as stream:
        return stream.read()


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``location`` (folders created as needed); returns the location."""
    location = os.fspath(location)
    if not is_uri(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return location
    filesystem, path = _resolve(location)
    with filesystem.open_output_stream(path) as stream:
        stream.write(data)
    return location


def write_text(location: str | os.PathLike, text: str) -> str:
    return write_bytes(location, text.encode("utf-8"))


def upload(local_file: str | os.PathLike, location: str | os.PathLike) -> str:
    """Copy a local file to ``location`` (a path or a URI)."""
    return write_bytes(location, Path(local_file).read_bytes())


def is_file(location: str | os.PathLike) -> bool:
    location = os.fspath(location)
    if not is_uri(location):
        return Path(location).is_file()
    from pyarrow import fs as pafs

    filesystem, path = _resolve(location)
    return filesystem.get_file_info(path).type == pafs.FileType.File


def list_names(location: str | os.PathLike) -> list[str]:
    """Names of the entries directly under the folder ``location`` (empty when there is none)."""
    location = os.fspath(location)
    if not is_uri(location):
        folder = Path(location)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    from pyarrow import fs as pafs

    filesystem, path = _resolve(location)
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except FileNotFoundError:
        return []
    return sorted(info.base_name for info in infos)
