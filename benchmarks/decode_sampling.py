"""Clips decoded per second on one core: each family's frame sampling against decoding every frame.

Videos (generated once into ``--out``, default ``/tmp/vlaunch_decode_bench``): ``--videos`` 30-second
clips, 320x240 (MSRVTT's size) at 30 fps, h264 (libx264 ``veryfast``, crf 18, B-frames, the settings
of ``sample_data.write_video``): a textured background panning like a camera, film grain on every
frame and ``sample_data.render_video``'s moving shapes on top, about 0.5 Mbit/s. Three encodings of
the same frames:

* ``gop250``: the encoder's default keyframe interval (x264: 250 frames, one keyframe every 8.3 s);
* ``gop2s``: a keyframe every 2 s (60 frames), as re-encoded datasets typically have;
* ``prepared``: the gop250 video through ``python -m trainers.core.compress`` with its defaults (a
  keyframe every half second, 7 non-reference B-frames between references, crf 23, same size and
  rate), the preparation step this project recommends before training on a dataset;
  ``--prepared 0.5 1 2`` measures it with other keyframe intervals as well (``prep 1s``, ...).

For each sampling and encoding, the same random draws go to both readers:

* ours: ``clip_sampling.read_sampled`` (metadata, sampling, decoding only the frames needed);
* baseline: open the file, decode every frame of the clip (the whole 30-s video) and keep the sampled
  ones, as loaders that read whole videos do;
* through last (stricter): the same, stopping at the last sampled frame (HF's ``read_video_pyav``).

Run: ``.venv/bin/python benchmarks/decode_sampling.py [--out DIR] [--seconds S] [--core N] [--only NAME]
[--prepared SECONDS ...] [--check]``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.core import clip_sampling as cs  # noqa: E402
from trainers.core.compress import CompressOptions, compress_video  # noqa: E402
from trainers.core.sample_data import _ALL_MOTIONS, render_video, write_video  # noqa: E402

WIDTH, HEIGHT, FPS, SECONDS = 320, 240, 30, 30
# Keyframe interval of each encoding written from the frames (None: the encoder's default); the
# "prepared" ones are made from gop250 by the compress command.
ENCODINGS = {"gop250": None, "gop2s": 2 * FPS}
TARGET = 5.0
VIDEO_VERSION = 1  # bump when the generated videos change

SAMPLINGS: dict[str, cs.Sampler] = {
    "ClipBERT 2 clips x 2 frm @2fps": functools.partial(
        cs.clipbert_indices, num_clips=2, frames_per_clip=2, target_fps=2
    ),
    "ClipBERT 8 clips x 2 frm @2fps": functools.partial(
        cs.clipbert_indices, num_clips=8, frames_per_clip=2, target_fps=2
    ),
    "ALPRO uniform 8": functools.partial(cs.alpro_indices, num_frames=8, sample="uniform"),
    "ALPRO headtail 8": functools.partial(cs.alpro_indices, num_frames=8, sample="headtail"),
    "ALPRO rand 8": functools.partial(cs.alpro_indices, num_frames=8, sample="rand"),
    "crossformer 16x4 window": functools.partial(cs.crossformer_indices, clip_len=16, frame_sample_rate=4),
    "Singularity 1 rand": functools.partial(cs.singularity_indices, num_frames=1, sample="rand"),
    "Singularity 4 middle": functools.partial(cs.singularity_indices, num_frames=4, sample="middle"),
}


def _frames(seed: int) -> np.ndarray:
    """900 frames of a panning textured scene with grain and moving shapes, uint8 (T, H, W, 3)."""
    rng = np.random.default_rng(seed)
    n = FPS * SECONDS
    texture = rng.uniform(0, 255, (HEIGHT // 8 + 8, (WIDTH + n) // 8 + 8, 3)).astype(np.float32)
    texture = np.kron(texture, np.ones((8, 8, 1), np.float32))
    k = 5  # box blur, so the texture has gradients as well as edges
    padded = np.pad(texture, ((k, k), (k, k), (0, 0)), mode="edge").cumsum(0).cumsum(1)
    texture = (
        padded[2 * k :, 2 * k :]
        - padded[: -2 * k, 2 * k :]
        - padded[2 * k :, : -2 * k]
        + padded[: -2 * k, : -2 * k]
    ) / (4 * k * k)
    motions = [_ALL_MOTIONS[i] for i in rng.integers(0, len(_ALL_MOTIONS), size=10)]
    shapes = render_video(rng, motions, "plain", num_frames=n, res=HEIGHT)
    shape_mask = np.abs(shapes.astype(np.int16) - shapes[:1, :1, :1].astype(np.int16)).sum(-1) > 0
    grain = rng.normal(0.0, 3.0, size=(17, HEIGHT, WIDTH, 3)).astype(np.float32)
    out = np.empty((n, HEIGHT, WIDTH, 3), np.uint8)
    left = (WIDTH - HEIGHT) // 2
    for t in range(n):
        y = int(4 + 3 * np.sin(t / 45))
        frame = texture[y : y + HEIGHT, t : t + WIDTH].copy()  # a pan of one pixel per frame
        frame[:, left : left + HEIGHT][shape_mask[t]] = shapes[t][shape_mask[t]]
        out[t] = np.clip(frame + grain[t % len(grain)], 0, 255)
    return out


def prepared_name(keyframe_seconds: float) -> str:
    default = keyframe_seconds == CompressOptions().keyframe_seconds
    return "prepared" if default else f"prep {keyframe_seconds:g}s"


def ensure_videos(out: Path, count: int, prepared: list[float]) -> dict[str, list[Path]]:
    """The benchmark videos, generated on first use; ``prepared``: the compress command's keyframe
    intervals to measure (its other options at their defaults)."""
    root = out / f"v{VIDEO_VERSION}"
    paths = {enc: [root / enc / f"video{i}.mp4" for i in range(count)] for enc in ENCODINGS}
    options = {}
    for seconds in prepared:
        name = prepared_name(seconds)
        options[name] = CompressOptions(keyframe_seconds=seconds)
        # Made again whenever the compress command's defaults change.
        tag = hashlib.sha256(repr(options[name]).encode()).hexdigest()[:8]
        paths[name] = [root / f"prepared-{tag}" / f"video{i}.mp4" for i in range(count)]
    for i in range(count):
        frames = None
        for enc, gop in ENCODINGS.items():
            path = paths[enc][i]
            if path.exists():
                continue
            frames = _frames(seed=1000 + i) if frames is None else frames
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.mp4")
            write_video(tmp, frames, fps=FPS, gop_size=gop)
            os.replace(tmp, path)
            print(f"generated {path} ({path.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
        for enc, option in options.items():
            if not paths[enc][i].exists():
                compress_video(paths["gop250"][i], paths[enc][i], option)
                print(
                    f"compressed {paths[enc][i]} ({paths[enc][i].stat().st_size / 1e6:.2f} MB)",
                    file=sys.stderr,
                )
    return paths


def decode_through(path: Path, indices: list[int], whole: bool = False) -> np.ndarray:
    """Baseline: decode from the first frame through the last wanted one (or to the end with
    ``whole``) and keep the wanted ones."""
    wanted = set(indices)
    last = max(indices)
    kept = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24", threads=1)  # as the reader converts
            if i >= last and not whole:
                break
    return np.stack([kept[i] for i in indices])


READERS = {
    "ours": lambda path, indices: cs.read_sampled(path, lambda vlen, fps, rng: indices)[0],
    "whole": lambda path, indices: decode_through(path, indices, whole=True),
    "through_last": decode_through,
}


def measure(paths: list[Path], sampler: cs.Sampler, seconds: float, seed: int) -> dict[str, float]:
    """Clips per second for each reader. The readers take turns on the same draws (so a busy machine
    slows them alike), cycling over the videos, until ``seconds`` have passed."""
    rng = np.random.default_rng(seed)
    info = {}
    for path in paths:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            info[path] = (stream.frames, float(stream.average_rate))
    for read in READERS.values():  # warm the page cache and imports
        read(paths[0], sampler(*info[paths[0]], np.random.default_rng(0)))
    spent = dict.fromkeys(READERS, 0.0)
    done = 0
    while sum(spent.values()) < seconds * len(READERS) or done < len(paths):
        path = paths[done % len(paths)]
        indices = sampler(*info[path], rng)
        for name, read in READERS.items():
            start = time.perf_counter()
            read(path, indices)
            spent[name] += time.perf_counter() - start
        done += 1
    return {name: done / t for name, t in spent.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/vlaunch_decode_bench"))
    parser.add_argument("--videos", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.5, help="time per measurement")
    parser.add_argument("--core", type=int, default=min(os.sched_getaffinity(0)))
    parser.add_argument("--only", default="", help="run the samplings whose name contains this")
    parser.add_argument("--check", action="store_true", help="verify ours == baseline frames first")
    parser.add_argument(
        "--prepared",
        type=float,
        nargs="*",
        default=[CompressOptions().keyframe_seconds],
        help="keyframe intervals (s) of the compress command's outputs to measure (default: its default)",
    )
    args = parser.parse_args(argv)

    os.sched_setaffinity(0, {args.core})
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    paths = ensure_videos(args.out, args.videos, args.prepared)

    rows = []
    for name, sampler in SAMPLINGS.items():
        if args.only.lower() not in name.lower():
            continue
        for enc, enc_paths in paths.items():
            if args.check:
                for path in enc_paths:
                    frames, indices, _ = cs.read_sampled(path, sampler, np.random.default_rng(1))
                    np.testing.assert_array_equal(frames, decode_through(path, indices))
            rates = measure(enc_paths, sampler, args.seconds, seed=7)
            rows.append({"sampling": name, "encoding": enc, **rates})

    print(
        f"one core (#{args.core}), {args.videos} videos x {SECONDS} s, {WIDTH}x{HEIGHT} @ {FPS} fps h264; "
        f"gop250 = encoder default keyframe interval, gop2s = keyframe every 2 s, prepared = gop250 "
        f"through trainers.core.compress (prep Xs: with --keyframe-seconds X); av {av.__version__}"
    )
    sizes = {enc: sum(p.stat().st_size for p in ps) / len(ps) / 1e6 for enc, ps in paths.items()}
    print("MB per video: " + ", ".join(f"{enc} {mb:.2f}" for enc, mb in sizes.items()))
    print(
        "baseline = decode every frame of the 30-s clip, keep the sampled ones; "
        "(through last: stop at the last sampled frame, a stricter baseline)"
    )
    header = (
        f"{'sampling':38} {'videos':11} {'ours clips/s':>12} {'baseline clips/s':>16} {'speed-up':>8}"
        f"  target >= {TARGET:g}x   {'through last clips/s':>20} {'speed-up':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        speedup, strict = r["ours"] / r["whole"], r["ours"] / r["through_last"]
        verdict = "met   " if speedup >= TARGET else "MISSED"
        print(
            f"{r['sampling']:38} {r['encoding']:11} {r['ours']:12.1f} {r['whole']:16.1f} {speedup:7.1f}x"
            f"  {verdict:14} {r['through_last']:20.1f} {strict:7.1f}x"
        )
    (args.out / "last_results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
