"""Code and config staging to a bucket: what the TPU workers download before they run anything.

The code is one deterministic tar.gz of the checkout's files (the launcher's snapshot list: tracked
files plus untracked ones git does not ignore, uncommitted edits included), content-addressed:

    <dest_prefix>/code/<sha256 of the archive>.tar.gz   the archive
    <dest_prefix>/code/<sha256 of the archive>.json     its manifest: commit, diff hash, files, bytes

The archive is byte-for-byte the same for the same files (sorted entries, zero times and owners,
normalised modes, gzip without a name or time), so staging unchanged code twice finds the object
already there with the same MD5 and uploads nothing. Every upload is checked against the MD5 the
bucket reports (`trainers.core.storage.upload`); the workers check it again on download
(`launcher/tpu/agent.py`), against the MD5 recorded here, so an object replaced in between is caught.

`render_staging` is the plan: what would go where, for `--dry-run`; it reads local files only.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from launcher.errors import LaunchError
from trainers.core import storage

CODE_DIR = "code"  # under dest_prefix


class StagingError(LaunchError):
    """Staging failed: one line naming the file or object and what to do."""


@dataclass(frozen=True)
class StagedCode:
    """Code staged to a bucket. `md5` is base64 as GCS reports it (`md5Hash`); `files` the file count;
    `bytes` the archive's size. `uploaded` is False when the same archive was already there."""

    url: str
    md5: str
    sha256: str
    files: int
    bytes: int
    commit: str | None
    diff_sha256: str | None
    manifest_url: str = ""
    uploaded: bool = True


@dataclass(frozen=True)
class _Archive:
    path: Path
    sha256: str
    md5: str
    size: int


def _check_files(source_dir: Path, files: Sequence[str]) -> None:
    if not files:
        raise StagingError(f"no files to stage from {source_dir}; pass the checkout's file list")
    for name in files:
        if os.path.isabs(name) or ".." in Path(name).parts:
            raise StagingError(f"cannot stage '{name}': file names must be relative to {source_dir}")
        path = source_dir / name
        if not path.is_symlink() and not path.is_file():
            raise StagingError(f"cannot stage '{name}': {path} is not a file (list files that exist)")


def _pack(source_dir: Path, files: Sequence[str], into: Path) -> _Archive:
    """Write the deterministic tar.gz of `files` to `into`; its sha256, MD5 (base64) and size."""
    _check_files(source_dir, files)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(set(files)):
            path = source_dir / name
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if path.is_symlink():
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, os.readlink(path), 0o777
                tar.addfile(info)
                continue
            data = path.read_bytes()
            info.size = len(data)
            info.mode = 0o755 if os.stat(path).st_mode & stat.S_IXUSR else 0o644
            tar.addfile(info, io.BytesIO(data))
    with open(into, "wb") as out, gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) as gz:
        gz.write(raw.getvalue())
    data = into.read_bytes()
    return _Archive(into, hashlib.sha256(data).hexdigest(), storage.md5_base64(into), len(data))


def _urls(dest_prefix: str, sha256: str) -> tuple[str, str]:
    base = storage.join(dest_prefix, CODE_DIR, sha256)
    return base + ".tar.gz", base + ".json"


def _remote_md5_or_none(url: str) -> str | None:
    try:
        if not storage.exists(url):
            return None
        return storage.remote_md5(url) if storage.is_remote(url) else storage.md5_base64(url)
    except FileNotFoundError:
        return None


def stage_code(
    source_dir: Path,
    files: list[str],
    dest_prefix: str,
    commit: str | None = None,
    diff_sha256: str | None = None,
) -> StagedCode:
    """Pack `files` (relative to `source_dir`) into one archive and put it at
    `<dest_prefix>/code/<sha256>.tar.gz` with its manifest beside it; skip the upload when an object
    with the same MD5 is already there. Raises StagingError (one line) when anything fails."""
    source_dir = Path(source_dir)
    with tempfile.TemporaryDirectory(prefix="vlaunch-stage-") as tmp:
        archive = _pack(source_dir, files, Path(tmp) / "code.tar.gz")
        url, manifest_url = _urls(dest_prefix, archive.sha256)
        try:
            uploaded = _remote_md5_or_none(url) != archive.md5
            if uploaded:
                storage.upload(archive.path, url, verify=True)
            manifest = {
                "url": url,
                "sha256": archive.sha256,
                "md5": archive.md5,
                "files": len(set(files)),
                "bytes": archive.size,
                "commit": commit,
                "diff_sha256": diff_sha256,
            }
            if uploaded or not storage.exists(manifest_url):
                storage.write_text(manifest_url, json.dumps(manifest, indent=2) + "\n")
        except StagingError:
            raise
        except (storage.StorageError, OSError, ValueError) as e:
            raise StagingError(f"staging the code to {url} failed: {_reason(e, url)}") from None
    return StagedCode(
        url=url,
        md5=archive.md5,
        sha256=archive.sha256,
        files=len(set(files)),
        bytes=archive.size,
        commit=commit,
        diff_sha256=diff_sha256,
        manifest_url=manifest_url,
        uploaded=uploaded,
    )


def stage_file(local_path: Path, url: str) -> str:
    """Upload one file (a resolved config, say) to `url`, verified against the bucket's MD5; an object
    already there with the same MD5 is left alone. Returns the MD5 (base64, as GCS reports it)."""
    local_path = Path(local_path)
    if not local_path.is_file():
        raise StagingError(f"cannot stage {local_path}: no such file")
    try:
        digest = storage.md5_base64(local_path)
        if _remote_md5_or_none(url) == digest:
            return digest
        return storage.upload(local_path, url, verify=True)
    except (storage.StorageError, OSError, ValueError) as e:
        raise StagingError(f"staging {local_path} to {url} failed: {_reason(e, url)}") from None


def render_staging(
    source_dir: Path,
    files: list[str],
    dest_prefix: str,
    commit: str | None = None,
    diff_sha256: str | None = None,
    extra_files: Sequence[tuple[Path, str]] = (),
) -> str:
    """What `stage_code` (and `stage_file` for each `(local path, url)` of `extra_files`) would upload
    where, as text. Reads the local files to name the archive; touches no bucket."""
    with tempfile.TemporaryDirectory(prefix="vlaunch-stage-") as tmp:
        archive = _pack(Path(source_dir), files, Path(tmp) / "code.tar.gz")
    url, manifest_url = _urls(dest_prefix, archive.sha256)
    origin = f"commit {commit or 'unknown'}" + (f" + diff sha256 {diff_sha256}" if diff_sha256 else "")
    lines = [
        f"code      {len(set(files))} files from {source_dir} ({origin}), "
        f"{archive.size} bytes, md5 {archive.md5}",
        f"  -> {url}",
        f"  manifest -> {manifest_url}",
    ]
    for local, target in extra_files:
        lines += [f"file      {local}", f"  -> {target}"]
    return "\n".join(lines)


def manifest_of(staged: StagedCode) -> dict:
    """The staged code as a plain dict (for records and JSON output)."""
    return asdict(staged)


def _reason(error: BaseException, url: str) -> str:
    """Why an upload to `url` failed, in one line. gcsfs reports a bucket that does not exist (or that
    these credentials cannot see) as FileNotFoundError(<the upload request's URL>), which says nothing."""
    if isinstance(error, FileNotFoundError) and url.startswith("gs://"):
        bucket = url.split("/", 3)[2]
        return (
            f"bucket gs://{bucket} does not exist or these credentials cannot see it; "
            "create it, or set backend.bucket= to one you can write to"
        )
    return " ".join(str(error).split()) or type(error).__name__
