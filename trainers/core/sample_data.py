"""Sample datasets the project generates itself, in the upstream annotation formats.

Each video shows one coloured shape moving in one direction (DiDeMo-style videos: two in a row) over a
plain or noisy background. The shape leaves a fading trail, so a single frame already shows which way it
moves: Singularity trains on one random frame per video. Captions and questions say what moves where,
in varied wording. Everything is drawn from a fixed seed, so a dataset is the same on every machine.

Layout of one dataset root (the same as a real ``data_root``)::

    <root>/anno/<upstream file names>.json
    <root>/videos/video<N>.mp4
    <root>/vocab.txt          BERT WordPiece vocabulary covering every word used (no download needed)
    <root>/sample_data.json   what was generated; written last, so its presence marks a finished root

``ensure_sample_data(name)`` builds a dataset once into a cache shared by all runs
(``$VLAUNCH_DATA_CACHE``, else ``~/.cache/vlaunch/sample_data``, under a ``v<FORMAT_VERSION>`` folder
so a format change regenerates). It builds in a temporary folder and renames it into place under a file
lock: concurrent jobs wait for the first one and reuse its result. CLI::

    python -m trainers.core.sample_data [--out DIR] [--scale S] [name ...]

This module must not import torch: the launcher imports it to check for and build data.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainers.core.text import pre_text

logger = logging.getLogger(__name__)

# Bump when the files' content or layout changes: caches keyed on the old version are left alone.
FORMAT_VERSION = 2
SEED = 20240601
CACHE_ENV = "VLAUNCH_DATA_CACHE"
MEDIA_DIR = "videos"
VOCAB_FILE = "vocab.txt"
STAMP_FILE = "sample_data.json"

RESOLUTION = 64  # pixels, square
FPS = 8
FRAMES_PER_VIDEO = {"msrvtt": 16, "didemo": 24, "msrvtt_qa": 16}  # 2-3 s at FPS

SAMPLE_DATASETS: tuple[str, ...] = ("msrvtt", "didemo", "msrvtt_qa")

_ANNO_FILES: dict[str, tuple[str, ...]] = {
    "msrvtt": ("anno/msrvtt_ret_train7k.json", "anno/msrvtt_ret_test1k.json"),
    "didemo": ("anno/didemo_ret_train.json", "anno/didemo_ret_val.json", "anno/didemo_ret_test.json"),
    "msrvtt_qa": (
        "anno/msrvtt_qa_train.json",
        "anno/msrvtt_qa_val.json",
        "anno/msrvtt_qa_test.json",
        "anno/msrvtt_qa_answer_list.json",
    ),
}

# Videos per split at scale 1.0. Test splits get distinct (size, colour, shape, direction) combinations,
# so every test caption names exactly one video: chance R@1 is 1 / number of test videos.
_SPLIT_VIDEOS: dict[str, dict[str, int]] = {
    "msrvtt": {"train7k": 400, "test1k": 100},
    "didemo": {"train": 800, "val": 50, "test": 100},  # one paragraph per video: as many pairs as msrvtt
    "msrvtt_qa": {"train": 400, "val": 50, "test": 100},
}
_MSRVTT_TRAIN_CAPTIONS = 2  # captions per training video, one annotation entry each (as upstream)

# --- what the videos can show, and the words for it ---------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 80, 255),
    "yellow": (240, 225, 30),
    "purple": (160, 50, 225),
    "orange": (250, 135, 20),
    "white": (245, 245, 245),
    "cyan": (20, 215, 225),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond", "ring")
SIZES: dict[str, int] = {"small": 7, "big": 12}  # shape radius in pixels
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUNDS: tuple[str, ...] = ("plain", "noisy")

_SIZE_WORDS = {"small": ("small", "little", "tiny"), "big": ("big", "large")}
_DIRECTION_PHRASES = {
    "left": ("to the left", "left", "leftward", "towards the left"),
    "right": ("to the right", "right", "rightward", "towards the right"),
    "up": ("up", "upward", "to the top", "towards the top"),
    "down": ("down", "downward", "to the bottom", "towards the bottom"),
}
_VERBS = (
    ("moves", "moving"),
    ("slides", "sliding"),
    ("travels", "traveling"),
    ("glides", "gliding"),
    ("drifts", "drifting"),
    ("goes", "going"),
)
_BACKGROUND_PHRASES = {
    "plain": ("on a plain background", "over a dark background"),
    "noisy": ("on a noisy background", "over a grainy background"),
}
_CAPTION_TEMPLATES = (
    "a {obj} {verb} {dir}",
    "the {obj} {verb} {dir}",
    "a {obj} {ing} {dir}",
    "there is a {obj} {ing} {dir}",
    "a {obj} {verb} {dir} across the screen",
    "video of a {obj} that {verb} {dir}",
    "a {size} {shape} colored {colour} {verb} {dir}",
    "{obj} {ing} {dir}",
)
_THEN = ("then", "after that", "next", "later", "and then")
_QUESTIONS = {
    "colour": (
        "what color is the {shape}",
        "what is the color of the {shape} moving {dir}",
        "which color does the moving {shape} have",
    ),
    "shape": ("what shape is moving {dir}", "what is the {colour} object", "which shape is {colour}"),
    "direction": (
        "which direction does the {colour} {shape} move",
        "where does the {shape} go",
        "in which direction is the {colour} {shape} moving",
    ),
    "size": ("is the {colour} {shape} big or small", "how big is the {shape}"),
}

_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class Motion:
    """One shape moving across the frame."""

    size: str
    colour: str
    shape: str
    direction: str


_ALL_MOTIONS: tuple[Motion, ...] = tuple(
    Motion(*combo) for combo in itertools.product(SIZES, COLOURS, SHAPES, DIRECTIONS)
)

# --- public helpers -----------------------------------------------------------------------------------


def dataset_files(name: str) -> tuple[str, ...]:
    """Paths, relative to a data root, that training on ``name`` needs: annotation files + video folder.

    Holds for real data too; ``vocab.txt`` is extra to the sample data (real runs use a hub tokenizer).
    """
    _check_name(name)
    return (*_ANNO_FILES[name], MEDIA_DIR)


def dataset_for_file(filename: str) -> str | None:
    """The sample dataset whose annotation file has this base name, or None."""
    base = os.path.basename(filename)
    for name, files in _ANNO_FILES.items():
        if any(os.path.basename(f) == base for f in files):
            return name
    return None


def default_cache_dir() -> Path:
    """``$VLAUNCH_DATA_CACHE``, else ``~/.cache/vlaunch/sample_data``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlaunch" / "sample_data"


def sample_data_root(name: str, cache_dir: str | os.PathLike | None = None, scale: float = 1.0) -> Path:
    """Where ``ensure_sample_data(name, cache_dir, scale)`` puts the dataset (generates nothing)."""
    _check_name(name)
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    leaf = name if scale == 1.0 else f"{name}-scale{scale:g}"
    return base / f"v{FORMAT_VERSION}" / leaf


def is_complete(root: str | os.PathLike) -> bool:
    """Whether ``root`` holds a finished sample dataset of the current format."""
    stamp = Path(root) / STAMP_FILE
    try:
        return json.loads(stamp.read_text())["format_version"] == FORMAT_VERSION
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_sample_data(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    scale: float = 1.0,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Return the root of sample dataset ``name``, generating it first if the cache lacks it.

    Safe to call from many processes at once: one generates, the others wait on a lock and reuse it.
    ``scale`` multiplies the number of videos (tests use small scales; each scale has its own root).
    """
    root = sample_data_root(name, cache_dir, scale)
    if is_complete(root):
        logger.info("reusing sample dataset %s at %s", name, root)
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if is_complete(root):  # built by another job while we waited for the lock
                logger.info("reusing sample dataset %s at %s", name, root)
                return root
            # Leftovers of a build that was killed (we hold the lock, so nobody else is building).
            for stale in root.parent.glob(f".{root.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if root.exists():
                shutil.rmtree(root)  # unfinished or of an older format
            logger.info("generating sample dataset %s into %s", name, root)
            # Not mkdtemp: its 0700 mode would keep other users of a shared cache out. The lock (and the
            # clean-up above) already make the name ours alone.
            tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
            tmp.mkdir()
            try:
                generate_sample_data(name, tmp, scale=scale, progress=progress)
                os.rename(tmp, root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return root
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def split_sizes(name: str, scale: float = 1.0) -> dict[str, int]:
    """Number of videos per split of ``name`` at ``scale`` (at least 2 each)."""
    _check_name(name)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return {split: max(2, round(n * scale)) for split, n in _SPLIT_VIDEOS[name].items()}


def build_vocab() -> list[str]:
    """The sample datasets' WordPiece vocabulary: specials, every word used, characters, filler.

    Every caption/question/answer word is a whole token; single characters (and ``##`` pieces) let
    any other word be spelled out instead of becoming ``[UNK]``. Padded to a multiple of 8 entries.
    """
    words: set[str] = set()
    fragments = [
        *COLOURS,
        *SHAPES,
        *SIZES,
        *DIRECTIONS,
        *itertools.chain.from_iterable(_SIZE_WORDS.values()),
        *itertools.chain.from_iterable(_DIRECTION_PHRASES.values()),
        *itertools.chain.from_iterable(_VERBS),
        *itertools.chain.from_iterable(_BACKGROUND_PHRASES.values()),
        *_CAPTION_TEMPLATES,
        *_THEN,
        *itertools.chain.from_iterable(_QUESTIONS.values()),
    ]
    for fragment in fragments:
        words.update(pre_text(re.sub(r"\{\w+\}", " ", fragment)).split())
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = list(_SPECIAL_TOKENS) + sorted(words - set(chars)) + chars + [f"##{c}" for c in chars]
    vocab += [f"[unused{i}]" for i in range(-len(vocab) % 8)]
    return vocab


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: int = FPS,
    codec: str | None = None,
    gop_size: int | None = None,
) -> None:
    """Write uint8 RGB frames ``(T, H, W, 3)`` (even H and W) as an mp4 (h264 if available, else mpeg4)."""
    import av

    codec = codec or _video_codec()
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # deterministic output, and cheap at this size
        if gop_size:
            stream.codec_context.gop_size = gop_size
        if codec == "libx264":
            # mbtree reads memory it has not initialised: with it, the same frames encode differently
            # from run to run (seen on x264 core 165), and the sample data would not be reproducible.
            stream.options = {"crf": "18", "preset": "veryfast", "x264-params": "mbtree=0"}
        else:
            stream.codec_context.bit_rate = 1_000_000
        for array in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def generate_sample_data(
    name: str,
    out_dir: str | os.PathLike,
    scale: float = 1.0,
    seed: int = SEED,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Write sample dataset ``name`` into ``out_dir`` (no lock, no cache: see ``ensure_sample_data``).

    Returns the stamp that is written last to ``out_dir/sample_data.json``.
    """
    sizes = split_sizes(name, scale)
    out = Path(out_dir)
    (out / "anno").mkdir(parents=True, exist_ok=True)
    (out / MEDIA_DIR).mkdir(exist_ok=True)
    say = progress or (lambda message: None)
    started = time.perf_counter()
    total = sum(sizes.values())
    written = 0
    dataset_seed = SAMPLE_DATASETS.index(name)
    annos: dict[str, list] = {}
    next_video = 0
    question_id = 0
    for split_number, (split, n_videos) in enumerate(sizes.items()):
        plan_rng = np.random.default_rng((seed, dataset_seed, split_number))
        planned = _plan_motions(plan_rng, n_videos, distinct=not split.startswith("train"))
        entries = []
        for i in range(n_videos):
            rng = np.random.default_rng((seed, dataset_seed, split_number, i))
            video = f"video{next_video}.mp4"
            next_video += 1
            motions = [planned[i]]
            if name == "didemo":
                motions.append(_other_motion(rng, planned[i]))
            background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
            frames = render_video(rng, motions, background, FRAMES_PER_VIDEO[name])
            write_video(out / MEDIA_DIR / video, frames)
            if name == "msrvtt":
                n_captions = _MSRVTT_TRAIN_CAPTIONS if split == "train7k" else 1
                for _ in range(n_captions):
                    entries.append({"video": video, "caption": _caption(rng, motions[0], background)})
            elif name == "didemo":
                first_sentence = _caption(rng, motions[0], background)
                then = _THEN[int(rng.integers(len(_THEN)))]
                second = _caption(rng, motions[1], None)
                entries.append(
                    {"video": video, "caption": [first_sentence, f"{then} {second[0].lower()}{second[1:]}"]}
                )
            else:
                for kind in _QUESTIONS:
                    question, answer = _question(rng, motions[0], kind)
                    entries.append(
                        {"video": video, "question": question, "answer": answer, "question_id": question_id}
                    )
                    question_id += 1
            written += 1
            if written % 100 == 0 or written == total:
                say(f"{name}: {written}/{total} videos ({time.perf_counter() - started:.1f}s)")
        annos[split] = entries

    for split, entries in annos.items():
        _write_json(out / "anno" / _anno_file_name(name, split), entries)
    if name == "msrvtt_qa":
        _write_json(
            out / "anno" / "msrvtt_qa_answer_list.json", sorted({*COLOURS, *SHAPES, *DIRECTIONS, *SIZES})
        )
    (out / VOCAB_FILE).write_text("\n".join(build_vocab()) + "\n")
    stamp = {
        "name": name,
        "format_version": FORMAT_VERSION,
        "scale": scale,
        "seed": seed,
        "videos": sizes,
        "annotations": {split: len(entries) for split, entries in annos.items()},
        "resolution": RESOLUTION,
        "fps": FPS,
        "frames_per_video": FRAMES_PER_VIDEO[name],
        "codec": _video_codec(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    _write_json(out / STAMP_FILE, stamp, indent=2)
    return stamp


# --- rendering ----------------------------------------------------------------------------------------


def render_video(
    rng: np.random.Generator,
    motions: Sequence[Motion],
    background: str,
    num_frames: int = 16,
    res: int = RESOLUTION,
) -> np.ndarray:
    """uint8 frames ``(num_frames, res, res, 3)``: the motions one after another, in equal segments."""
    base = rng.integers(0, 60, size=3).astype(np.float32)
    canvas = np.broadcast_to(base, (res, res, 3)).astype(np.float32)
    if background == "noisy":
        canvas = canvas + rng.normal(0.0, 22.0, size=(res, res, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32)
    clips = []
    bounds = np.linspace(0, num_frames, len(motions) + 1).astype(int)
    for motion, seg_start, seg_end in zip(motions, bounds[:-1], bounds[1:], strict=True):
        seg_len = int(seg_end - seg_start)
        radius = SIZES[motion.size]
        margin = radius + 3
        ux, uy = DIRECTIONS[motion.direction]
        across = rng.uniform(margin, res - margin)  # position on the axis the shape does not move along
        # distance travelled from the edge the shape leaves, at the first and the last frame
        first, last = rng.uniform(margin, margin + 4), rng.uniform(res - margin - 4, res - margin)
        colour = np.array(COLOURS[motion.colour], dtype=np.float32)
        gap = 0.9 * radius
        for t in range(seg_len):
            travelled = first + (last - first) * t / max(1, seg_len - 1)
            frame = canvas.copy()
            # oldest trail copy first, the shape itself (k=0) last and opaque
            for k in range(4, -1, -1):
                cx, cy = _to_xy(travelled - k * gap, across, ux, uy, res)
                alpha = 1.0 if k == 0 else 0.45 * 0.55 ** (k - 1)
                mask = _shape_mask(motion.shape, cx, cy, radius, xx, yy)
                frame[mask] = (1 - alpha) * frame[mask] + alpha * colour
            clips.append(np.clip(frame, 0, 255).astype(np.uint8))
    return np.stack(clips)


def _to_xy(travelled: float, across: float, ux: int, uy: int, res: int) -> tuple[float, float]:
    """Pixel centre (x, y) of a shape ``travelled`` pixels from the edge it leaves (image y points down)."""
    if ux:
        return (travelled if ux > 0 else res - travelled), across
    return across, (travelled if uy > 0 else res - travelled)


def _shape_mask(shape: str, cx: float, cy: float, r: float, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.5 * r) ** 2)
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":
        return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= 0.55 * (dy + r))
    if shape == "cross":
        arm = 0.3 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


# --- wording ------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _surface(rng: np.random.Generator, text: str, end: str) -> str:
    """Vary capitalisation and end punctuation the way real annotations do (pre_text removes both)."""
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text + end if rng.random() < 0.5 else text


def _caption(rng: np.random.Generator, motion: Motion, background: str | None) -> str:
    verb, ing = _pick(rng, _VERBS)
    size = _pick(rng, _SIZE_WORDS[motion.size])
    words = {
        "obj": f"{size} {motion.colour} {motion.shape}",
        "size": size,
        "colour": motion.colour,
        "shape": motion.shape,
        "verb": verb,
        "ing": ing,
        "dir": _pick(rng, _DIRECTION_PHRASES[motion.direction]),
    }
    text = _pick(rng, _CAPTION_TEMPLATES).format(**words)
    if background is not None and rng.random() < 0.3:
        text = f"{text} {_pick(rng, _BACKGROUND_PHRASES[background])}"
    return _surface(rng, text, ".")


def _question(rng: np.random.Generator, motion: Motion, kind: str) -> tuple[str, str]:
    words = {
        "colour": motion.colour,
        "shape": motion.shape,
        "dir": _pick(rng, _DIRECTION_PHRASES[motion.direction]),
    }
    question = _surface(rng, _pick(rng, _QUESTIONS[kind]).format(**words), "?")
    answer = {
        "colour": motion.colour,
        "shape": motion.shape,
        "direction": motion.direction,
        "size": motion.size,
    }
    return question, answer[kind]


def _plan_motions(rng: np.random.Generator, n: int, distinct: bool) -> list[Motion]:
    if not distinct:
        return [_ALL_MOTIONS[int(i)] for i in rng.integers(len(_ALL_MOTIONS), size=n)]
    order: list[int] = []
    while len(order) < n:  # more videos than combinations: repeat a fresh permutation
        order.extend(int(i) for i in rng.permutation(len(_ALL_MOTIONS)))
    return [_ALL_MOTIONS[i] for i in order[:n]]


def _other_motion(rng: np.random.Generator, motion: Motion) -> Motion:
    """A second segment that differs in shape-or-colour and in direction, so the two are told apart."""
    while True:
        other = _ALL_MOTIONS[int(rng.integers(len(_ALL_MOTIONS)))]
        if other.direction != motion.direction and (other.colour, other.shape) != (
            motion.colour,
            motion.shape,
        ):
            return other


# --- files --------------------------------------------------------------------------------------------


def _anno_file_name(name: str, split: str) -> str:
    return {"msrvtt": "msrvtt_ret_{}.json", "didemo": "didemo_ret_{}.json", "msrvtt_qa": "msrvtt_qa_{}.json"}[
        name
    ].format(split)


def _write_json(path: Path, obj, indent: int | None = None) -> None:
    path.write_text(json.dumps(obj, indent=indent) + "\n")


def _video_codec() -> str:
    import av

    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except (av.FFmpegError, ValueError):
        return "mpeg4"


def _check_name(name: str) -> None:
    if name not in SAMPLE_DATASETS:
        raise ValueError(f"unknown sample dataset {name!r}; choose from {', '.join(SAMPLE_DATASETS)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainers.core.sample_data",
        description="Generate the sample datasets (synthetic videos in the upstream annotation formats).",
    )
    parser.add_argument(
        "names", nargs="*", metavar="name", help=f"datasets (default: all of {SAMPLE_DATASETS})"
    )
    parser.add_argument("--out", help=f"cache directory (default: ${CACHE_ENV} or {default_cache_dir()})")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the number of videos (default 1)")
    args = parser.parse_args(argv)
    names = args.names or list(SAMPLE_DATASETS)
    unknown = [n for n in names if n not in SAMPLE_DATASETS]
    if unknown:
        parser.error(f"unknown dataset {unknown[0]!r}; choose from {', '.join(SAMPLE_DATASETS)}")
    for name in names:
        started = time.perf_counter()
        root = sample_data_root(name, args.out, args.scale)
        if is_complete(root):
            print(f"{name}: already at {root}", flush=True)
            continue
        print(f"{name}: generating into {root}", flush=True)
        ensure_sample_data(name, args.out, args.scale, progress=lambda msg: print(msg, flush=True))
        print(f"{name}: done in {time.perf_counter() - started:.1f}s -> {root}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
