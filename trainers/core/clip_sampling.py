"""Which frames ClipBERT, ALPRO and crossformer take from a video, and reading just those frames.

Each sampler is a pure function ``sampler(vlen, fps, rng, *, parameters...) -> list[int]`` of the
video's length in frames, its frame rate and a numpy Generator; bind the parameters with
``functools.partial`` and hand the result to ``read_sampled``, which learns ``vlen`` and ``fps`` from
the container and decodes only the returned frames (``trainers.core.video.read_chosen_frames``).

Every sampler returns indices inside ``[0, vlen)``, always the same number for given parameters: a
video too short for the request repeats frames instead of failing (upstream skips such videos or
raises). ``training=False`` makes every sampler deterministic. With ``rng=None`` the randomness comes
from numpy's global state, as in upstream's loaders (a DataLoader ``worker_init_fn`` seeds it).

Singularity's samplers live in ``trainers.core.video.frame_indices``; ``singularity_indices`` adapts
them to the signature here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np

from trainers.core.video import frame_indices, read_chosen_frames

# (vlen, fps, rng) -> frame indices; the family's parameters already bound (functools.partial).
Sampler = Callable[[int, float | None, np.random.Generator | None], list[int]]

ALPRO_SAMPLES: tuple[str, ...] = ("uniform", "rand", "nlvl_rand", "headtail")


def clipbert_indices(
    vlen: int,
    fps: float | None,
    rng: np.random.Generator | None = None,
    *,
    num_clips: int,
    frames_per_clip: int,
    target_fps: float,
    training: bool = True,
) -> list[int]:
    """ClipBERT's sparse sampling: ``num_clips`` short clips of ``frames_per_clip`` frames each.

    Follows upstream ``src/datasets/decoder.py`` (SlowFast's decoder, ``sampling_rate=1``): a clip
    spans ``frames_per_clip / target_fps`` seconds, i.e. ``clip_size = frames_per_clip / target_fps *
    fps`` source frames, and its frames are ``linspace(0, clip_size - 1, frames_per_clip)`` into that
    span. In training each clip starts anywhere in ``[0, vlen - clip_size]`` independently of the
    others (``get_start_end_idx`` with ``clip_idx=-1``); at test clip ``i`` starts at ``(vlen -
    clip_size) * i / num_clips`` (upstream's formula: the last clip stops short of the end). A video
    shorter than a clip gives clips that start at 0 and repeat its last frame.

    Returns ``num_clips * frames_per_clip`` indices, clip after clip, clips ordered by start (the model
    pools clip scores with mean/max/LSE, so their order does not matter), ascending within a clip.
    """
    _check_vlen(vlen)
    if num_clips < 1 or frames_per_clip < 1:
        raise ValueError(f"num_clips and frames_per_clip must be >= 1, got {num_clips} and {frames_per_clip}")
    if not fps or fps <= 0:
        raise ValueError("ClipBERT sampling needs the video's frame rate (fps)")
    if not target_fps > 0:
        raise ValueError(f"target_fps must be > 0, got {target_fps}")
    clip_size = frames_per_clip / target_fps * fps
    delta = max(vlen - clip_size, 0.0)
    if training:
        starts = (
            sorted(_generator(rng).uniform(0.0, delta, size=num_clips)) if delta > 0 else [0.0] * num_clips
        )
    else:
        starts = [delta * i / num_clips for i in range(num_clips)]
    offsets = np.linspace(0.0, max(clip_size - 1, 0.0), frames_per_clip).astype(int)
    indices: list[int] = []
    for start in starts:
        # Upstream decodes the frames whose timestamps lie in [start, start + clip_size - 1] and
        # indexes into them: the first is frame ceil(start), the last floor(start + clip_size - 1).
        first = min(math.ceil(start), vlen - 1)
        last = max(first, min(math.floor(start + clip_size - 1), vlen - 1))
        indices.extend(int(min(first + o, last)) for o in offsets)
    return indices


def alpro_indices(
    vlen: int,
    fps: float | None = None,
    rng: np.random.Generator | None = None,
    *,
    num_frames: int,
    sample: str = "rand",
    training: bool = True,
) -> list[int]:
    """ALPRO's frame choice (upstream ``AlproBaseDataset._load_video_from_path_decord``), ascending.

    ``sample`` is one of:

    * ``uniform``: frame ``floor(i * vlen / num_frames)`` for each ``i``, evenly spaced from frame 0.
      Upstream writes ``np.arange(0, vlen, vlen / n, dtype=int)``, which numpy computes with the step
      truncated to an integer (30 frames, 8 wanted: 0, 3, ..., 21, never the end of the video); this is
      the spacing it means, the same as upstream's ``nlvl_uniform``. The test-time choice.
    * ``rand``: ``num_frames`` distinct frames drawn anywhere in the video, sorted (upstream's ``rand``:
      ``sorted(random.sample(range(vlen), n))``; the training choice of ALPRO's fine-tuning configs).
    * ``nlvl_rand``: one random frame inside each of the ``num_frames`` intervals that ``uniform``
      starts (upstream's ``nlvl_rand``).
    * ``headtail``: half the frames drawn from the first half of the video, the other half from the
      second (pretraining). Upstream draws ``n // 2`` from each; an odd ``n`` gives the tail one more.

    ``fps`` is unused (the common sampler signature). At test (``training=False``) ``rand`` and
    ``nlvl_rand`` become ``uniform`` and ``headtail`` takes ``uniform`` inside each half. A video
    shorter than the request uses each available frame and repeats the last (upstream fails on it).
    """
    del fps
    _check_vlen(vlen)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if sample not in ALPRO_SAMPLES:
        raise ValueError(f"unknown ALPRO sample {sample!r}: expected one of {', '.join(ALPRO_SAMPLES)}")
    if sample == "headtail":
        half = vlen // 2
        n_head = num_frames // 2
        head_range, tail_range = (0, max(half, 1)), (half, vlen)
        parts = []
        for (lo, hi), n in ((head_range, n_head), (tail_range, num_frames - n_head)):
            if n:
                chosen = _distinct(hi - lo, n, rng) if training else _uniform(hi - lo, n)
                parts.extend(lo + i for i in chosen)
        return parts
    if not training or sample == "uniform":
        return _uniform(vlen, num_frames)
    if sample == "rand":
        return _distinct(vlen, num_frames, rng)
    # nlvl_rand: a random offset inside each interval [starts[i], starts[i + 1])
    starts = _uniform(vlen, num_frames)
    ends = starts[1:] + [vlen]
    gen = _generator(rng)
    return [int(s + gen.integers(0, max(e - s, 1))) for s, e in zip(starts, ends, strict=True)]


def crossformer_indices(
    vlen: int,
    fps: float | None = None,
    rng: np.random.Generator | None = None,
    *,
    clip_len: int = 16,
    frame_sample_rate: int = 4,
    training: bool = True,
) -> list[int]:
    """crossformer's window: ``clip_len`` frames spread over ``clip_len * frame_sample_rate`` frames.

    Follows ``sample_frame_indices`` of the transformers VideoMAE example that crossformer calls with
    ``clip_len=16, frame_sample_rate=4``: the window ends at a random ``end`` in ``[clip_len *
    frame_sample_rate, vlen)``, starts ``clip_len * frame_sample_rate`` frames earlier, and its frames
    are ``linspace(start, end, clip_len)`` clipped to ``end - 1``, so consecutive frames are 4 or 5
    apart for 16x4 (64 / 15), not exactly ``frame_sample_rate``. At test the window is centred.
    A video no longer than the window (upstream's ``randint`` fails on it) takes every
    ``frame_sample_rate``-th frame from 0 and repeats the last frame, as VideoMAE's own loader does.
    """
    del fps
    _check_vlen(vlen)
    if clip_len < 1 or frame_sample_rate < 1:
        raise ValueError(
            f"clip_len and frame_sample_rate must be >= 1, got {clip_len} and {frame_sample_rate}"
        )
    span = clip_len * frame_sample_rate
    if vlen <= span:
        return [min(i * frame_sample_rate, vlen - 1) for i in range(clip_len)]
    end = int(_generator(rng).integers(span, vlen)) if training else (vlen - span) // 2 + span
    start = end - span
    return np.clip(np.linspace(start, end, num=clip_len), start, end - 1).astype(np.int64).tolist()


def singularity_indices(
    vlen: int,
    fps: float | None = None,
    rng: np.random.Generator | None = None,
    *,
    num_frames: int,
    sample: str = "rand",
) -> list[int]:
    """Singularity's ``get_frame_indices`` (``trainers.core.video.frame_indices``) as a ``Sampler``."""
    return frame_indices(num_frames, vlen, sample, rng=rng, input_fps=fps)


def read_sampled(
    path: str | os.PathLike, sampler: Sampler, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, list[int], int]:
    """Sample frame indices with ``sampler`` and decode only those frames.

    Returns ``(frames, indices, vlen)`` like ``read_frames``: uint8 ``(T, H, W, 3)`` RGB in the order
    of ``indices``. The length and rate come from the container's metadata (as ``video_info``; the
    file is opened once), the decoding is ``read_clip_frames``'s.
    """
    return read_chosen_frames(path, lambda vlen, fps: sampler(vlen, fps, rng))


# --- internals -------------------------------------------------------------------------------------


def _check_vlen(vlen: int) -> None:
    if vlen < 1:
        raise ValueError(f"cannot sample frames from a video with {vlen} frames")


def _generator(rng: np.random.Generator | None) -> np.random.Generator:
    # Without a Generator, one draw from numpy's global state seeds one, so np.random.seed reproduces.
    return rng if rng is not None else np.random.default_rng(np.random.randint(2**31))


def _uniform(length: int, n: int) -> list[int]:
    """``floor(i * length / n)``: evenly spaced from 0; repeats frames when ``length < n``."""
    return [i * length // n for i in range(n)]


def _distinct(length: int, n: int, rng: np.random.Generator | None) -> list[int]:
    """``n`` distinct sorted draws from ``range(length)``; all of them, last repeated, when too few."""
    if length <= n:
        return list(range(length)) + [length - 1] * (n - length)
    return sorted(int(i) for i in _generator(rng).choice(length, size=n, replace=False))
