"""ClipBERT's LMDB video store: pack a folder of videos into one LMDB, and read videos back from it.

Upstream (jayleicn/ClipBERT `src/preprocessing/file2lmdb.py`) stores each video's encoded file bytes
under its file name without extension and decodes them in memory with PyAV. So does this module: the
key is the path relative to the packed folder without its extension (for a flat folder, the file's stem,
as upstream), the value the file's bytes, unchanged. Reading one video is then one B-tree lookup in a
memory-mapped file instead of a file open, which is what upstream chose it for on clusters whose shared
filesystems are slow at many small files (see `benchmarks/lmdb_read.py` for what it does here).

    python -m trainers.clipbert.lmdb_pack <video_dir> <out.lmdb> [--ext mp4 avi ...]

Train from it with `trainer.video_store=lmdb` (the LMDB at `trainer.video_lmdb`, default
`<data_root>/<media_dir>.lmdb`). No torch here.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from trainers.core.video import VIDEO_EXTENSIONS, find_videos

_COMMIT_EVERY = 256  # videos per write transaction


def video_key(relative: str | os.PathLike) -> str:
    """The LMDB key of a video file: its path relative to the packed folder, without the extension."""
    return Path(relative).with_suffix("").as_posix()


def pack(
    video_dir: str | os.PathLike,
    out: str | os.PathLike,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
    progress: Callable[[str], None] | None = None,
) -> int:
    """Write every video under ``video_dir`` into the LMDB ``out`` (a directory); returns the count.

    The map size is the videos' total size with room for LMDB's pages. Two videos with the same key
    (``a.mp4`` and ``a.avi``) are an error, not a silent overwrite.
    """
    import lmdb

    video_dir, out = Path(video_dir), Path(out)
    if not video_dir.is_dir():
        raise FileNotFoundError(
            f"video folder {video_dir} does not exist; give the folder holding the videos"
        )
    files = find_videos(video_dir, extensions)
    if not files:
        raise FileNotFoundError(f"no videos ({', '.join(extensions)}) under {video_dir}")
    keys: dict[str, Path] = {}
    for path in files:
        key = video_key(path.relative_to(video_dir))
        if key in keys:
            raise ValueError(f"{keys[key]} and {path} would share the LMDB key {key!r}; rename one")
        keys[key] = path
    total_bytes = sum(p.stat().st_size for p in files)
    say = progress or (lambda message: None)
    started = time.perf_counter()
    env = lmdb.open(str(out), map_size=max(2 * total_bytes + (64 << 20), 1 << 26), subdir=True)
    try:
        done = 0
        txn = env.begin(write=True)
        for key, path in keys.items():
            txn.put(key.encode(), path.read_bytes())
            done += 1
            if done % _COMMIT_EVERY == 0:
                txn.commit()
                txn = env.begin(write=True)
            if done % 100 == 0 or done == len(keys):
                say(f"{done}/{len(keys)} videos, {total_bytes / 2**20:.1f} MiB in all "
                    f"({time.perf_counter() - started:.1f}s)")  # fmt: skip
        txn.commit()
        env.sync()
    finally:
        env.close()
    return len(keys)


_ENVIRONMENTS: dict[tuple[Path, int], object] = {}


def _environment(path: Path):
    """One read-only environment per LMDB and process (LMDB refuses to open one twice in a process)."""
    key = (path, os.getpid())
    if key not in _ENVIRONMENTS:
        import lmdb

        _ENVIRONMENTS[key] = lmdb.open(
            str(path), readonly=True, lock=False, readahead=False, meminit=False, max_readers=1024
        )
    return _ENVIRONMENTS[key]


class LmdbVideo(io.BytesIO):
    """One video's bytes from the store, readable by `trainers.core.video` like a path (its name is
    ``<lmdb>:<key>``, for error messages)."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name

    def __fspath__(self) -> str:
        return self.name


class LmdbVideoStore:
    """Read-only access to a packed LMDB. Opened lazily in each process (an LMDB environment must not
    cross a fork: DataLoader workers open their own)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not (self.path / "data.mdb").is_file():
            raise FileNotFoundError(
                f"LMDB video store not found: {self.path}; pack the videos with "
                f"`python -m trainers.clipbert.lmdb_pack <video_dir> {self.path}` or set trainer.video_store=files"
            )
        self._env = None
        self._pid = -1

    def _open(self):
        if self._env is None or self._pid != os.getpid():
            self._env, self._pid = _environment(self.path.resolve()), os.getpid()
        return self._env

    def get(self, relative: str | os.PathLike) -> LmdbVideo:
        """The video stored for ``relative`` (a path under the media folder, extension ignored)."""
        key = video_key(relative)
        with self._open().begin(buffers=False) as txn:
            data = txn.get(key.encode())
        if data is None:
            raise KeyError(
                f"video {key!r} is not in the LMDB store {self.path}; re-pack it from the video folder"
            )
        return LmdbVideo(data, f"{self.path}:{key}")

    def keys(self) -> Iterator[str]:
        with self._open().begin() as txn:
            for key in txn.cursor().iternext(values=False):
                yield bytes(key).decode()

    def __getstate__(self) -> dict:
        return {"path": self.path, "_env": None, "_pid": -1}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainers.clipbert.lmdb_pack",
        description="Pack a folder of videos into an LMDB (encoded bytes keyed by the path without "
        "extension), ClipBERT's video store.",
    )
    parser.add_argument("video_dir", help="folder holding the videos (searched recursively)")
    parser.add_argument("out", help="the LMDB to write (a directory; e.g. <data_root>/videos.lmdb)")
    parser.add_argument("--ext", nargs="+", default=list(VIDEO_EXTENSIONS), help="video file extensions")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        parser.error(f"{args.out} exists and is not empty; remove it or choose another output")
    started = time.perf_counter()
    try:
        count = pack(args.video_dir, args.out, args.ext, progress=lambda m: print(m, flush=True))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"packed {count} videos into {args.out} in {time.perf_counter() - started:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
