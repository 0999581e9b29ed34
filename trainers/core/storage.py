"""One storage module: local paths and `gs://` URLs through the same few functions (fsspec).

Trainers write metrics, status files and checkpoint markers through here, so a run dir can be a
local folder or a bucket prefix; the launcher stages code and configs through here. Writes of one
file are atomic for a reader: locally through a temporary file and a rename, on GCS because an
object appears only when its upload is complete. Transfers can be verified against the checksums
GCS keeps for every object (`md5Hash`, `crc32c`), so a staged file that arrives damaged is an error,
not a silent corruption.

No torch or jax here; fsspec and gcsfs are imported on first remote use. Against an emulator gcsfs
must not probe for hierarchical-namespace buckets (see infra/fake_gcs.py): that is switched off
before gcsfs is first imported unless the user set it.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import posixpath
import secrets
import shutil
from pathlib import Path
from typing import Any

REMOTE_SCHEMES = ("gs://", "gcs://", "memory://")


class StorageError(RuntimeError):
    """A transfer failed or arrived damaged; the message names the object and what differed."""


def is_remote(path: str | os.PathLike) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for a local path or a URL (URLs always use `/`)."""
    base = str(base)
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return str(Path(base).joinpath(*parts))


def filesystem(path: str | os.PathLike) -> tuple[Any, str]:
    """The fsspec filesystem holding `path`, and the path as that filesystem names it."""
    if str(path).startswith(("gs://", "gcs://")):
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import fsspec.core

    return fsspec.core.url_to_fs(str(path))


def out_of_space(error: OSError) -> bool:
    """Whether a failed write ran out of room (a full disk, a quota, a file size limit), so that
    freeing space fixes it; not for permissions or a read-only filesystem."""
    return error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def free_space(path: str | os.PathLike) -> str:
    """The clause ", N MiB free there" for the filesystem of a local `path` (or of its nearest existing
    parent), for messages about a write that failed; "" for a URL, or when it cannot be told."""
    if is_remote(path):
        return ""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        return f", {shutil.disk_usage(where).free / 2**20:.0f} MiB free there"
    except OSError:
        return ""


def exists(path: str | os.PathLike) -> bool:
    if not is_remote(path):
        return Path(path).exists()
    fs, p = filesystem(path)
    return fs.exists(p)


def read_bytes(path: str | os.PathLike) -> bytes:
    if not is_remote(path):
        return Path(path).read_bytes()
    fs, p = filesystem(path)
    return fs.cat_file(p)


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a whole file so that a reader sees the old content or the new, never a part."""
    if not is_remote(path):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
        return
    fs, p = filesystem(path)
    fs.pipe_file(p, data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def listdir(path: str | os.PathLike) -> list[str]:
    """Names (not paths) of the entries directly under `path`; empty when it does not exist."""
    if not is_remote(path):
        p = Path(path)
        return sorted(e.name for e in p.iterdir()) if p.is_dir() else []
    fs, p = filesystem(path)
    try:
        entries = fs.ls(p, detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def remove(path: str | os.PathLike, recursive: bool = False) -> None:
    """Delete a file (or a tree with `recursive`); a missing path is not an error."""
    if not is_remote(path):
        p = Path(path)
        if p.is_dir() and recursive:
            import shutil

            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        return
    fs, p = filesystem(path)
    try:
        fs.rm(p, recursive=recursive)
    except FileNotFoundError:
        pass


def md5_base64(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """A local file's MD5 the way GCS reports it (`md5Hash`: base64 of the digest)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return base64.b64encode(h.digest()).decode()


def remote_md5(url: str) -> str | None:
    """The `md5Hash` GCS keeps for an object (None where the store keeps none, e.g. composed objects)."""
    fs, p = filesystem(url)
    fs.invalidate_cache(p)
    return fs.info(p).get("md5Hash")


def upload(local: str | os.PathLike, url: str, verify: bool = True) -> str:
    """Copy a local file to `url`; with `verify`, compare the object's MD5 as the store reports it
    with the local file's. Returns the MD5 (base64)."""
    digest = md5_base64(local)
    if not is_remote(url):
        write_bytes(url, Path(local).read_bytes())
        return digest
    fs, p = filesystem(url)
    fs.put_file(str(local), p)
    if verify:
        _check_md5(url, digest, "uploaded")
    return digest


def download(url: str, local: str | os.PathLike, verify: bool = True) -> str:
    """Copy `url` to a local file (written to a temporary name, renamed when complete); with
    `verify`, the file's MD5 must equal the object's. Returns the MD5 (base64)."""
    target = Path(local)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
    try:
        if is_remote(url):
            fs, p = filesystem(url)
            fs.get_file(p, str(tmp))
        else:
            tmp.write_bytes(Path(url).read_bytes())
        digest = md5_base64(tmp)
        if verify and is_remote(url):
            _check_md5(url, digest, "downloaded")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def _check_md5(url: str, local_md5: str, verb: str) -> None:
    stored = remote_md5(url)
    if stored is not None and stored != local_md5:
        raise StorageError(
            f"{url}: the {verb} file is damaged (MD5 here {local_md5}, in the bucket {stored}); try again"
        )
