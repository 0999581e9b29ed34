"""Clips per second read + decoded from video files vs from ClipBERT's LMDB store, on the sample data.

    python benchmarks/lmdb_read.py [--dataset msrvtt_qa] [--scale 1.0] [--repeats 3]

Each "clip read" is what one ClipBERT training item costs before the model: open the video (a file, or
the bytes of one LMDB lookup), sample 2 clips x 2 frames (`clipbert_indices`, training mode) and decode
just those frames with PyAV. One process, one thread; the LMDB is packed once into a temporary folder.
The OS page cache is warm for both (the videos were just generated or read), so this measures the
per-video overhead of the two stores, not a cold network filesystem, where LMDB's single file is what
upstream chose it for.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import numpy as np

from trainers.clipbert.lmdb_pack import LmdbVideoStore, pack
from trainers.core.clip_sampling import clipbert_indices, read_sampled
from trainers.core.sample_data import ensure_sample_data
from trainers.core.video import find_videos


def rate(read, videos: list[str], repeats: int) -> float:
    sampler = functools.partial(clipbert_indices, num_clips=2, frames_per_clip=2, target_fps=4.0)
    rng = np.random.default_rng(0)
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        for video in videos:
            read_sampled(read(video), sampler, rng)
        best = max(best, len(videos) / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="msrvtt_qa")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = ensure_sample_data(args.dataset, scale=args.scale)
    media = root / "videos"
    videos = [p.relative_to(media).as_posix() for p in find_videos(media)]
    with tempfile.TemporaryDirectory() as tmp:
        store_path = Path(tmp) / "videos.lmdb"
        pack(media, store_path)
        store = LmdbVideoStore(store_path)
        files = rate(lambda v: media / v, videos, args.repeats)
        lmdb = rate(store.get, videos, args.repeats)
    size = sum((media / v).stat().st_size for v in videos) / len(videos) / 1024
    print(
        f"{len(videos)} sample videos ({args.dataset}, {size:.1f} KiB each), 2 clips x 2 frames per read, best of {args.repeats}"
    )
    print(f"files: {files:8.1f} clips/s")
    print(f"lmdb:  {lmdb:8.1f} clips/s  ({lmdb / files:.2f}x files)")


if __name__ == "__main__":
    main()
