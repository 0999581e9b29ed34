"""The crossformer's sample dataset (`vat`: video, audio, text), in the seed's layout.

Each clip is a video of the shared generator (`trainers.core.sample_data`: one coloured shape moving one
way), a caption saying what moves where, and a sound that goes with it: a tone whose pitch names the
shape's colour (one pitch per colour, two mel bins apart even at 16 bins) pulsing at a rate that names
the direction, over a little noise. So text, audio and video all describe the same event, and matching
them is learnable from any of the two other modalities.

Layout (the seed's `train.csv` / `validation.csv` with columns `video,audio,text`, paths relative to the
three roots; its `datasets/{video,audio,text}` folders)::

    <root>/train.csv, <root>/validation.csv
    <root>/datasets/video/clip<N>.mp4      24 frames, 64 x 64, 8 fps
    <root>/datasets/audio/clip<N>.wav      3 s, 16 kHz, 16-bit mono (stdlib `wave`)
    <root>/datasets/text/clip<N>.txt       one title, hashtags after '#' (as the seed's YouTube titles)
    <root>/vocab.txt                       the sample tokenizer's vocabulary (every word used)
    <root>/sample_data.json                written last: a finished root

No torch here: the launcher side may import it through `trainers.core.sample_data`.
"""

from __future__ import annotations

import csv
import json
import os
import time
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np

from trainers.core import sample_data as core

NAME = "vat"
SAMPLE_RATE = 16000
FRAMES = 24  # 3 s at core.FPS: longer than the tiny window, so training windows move
MEDIA_DIR = "datasets"
ROOTS = {"video": "datasets/video", "audio": "datasets/audio", "text": "datasets/text"}
ANNO_FILES = ("train.csv", "validation.csv")
CSV_COLUMNS = ("video", "audio", "text")  # the seed's column names

# Tone per colour, Hz: the centres of every other of 16 kaldi mel bins (20 Hz - 8 kHz), so each colour
# lands in a bin of its own at the tiny config's 16 bins and is far apart at 128.
PITCHES = dict(zip(core.COLOURS, (264.0, 590.0, 1029.0, 1619.0, 2411.0, 3471.0, 4880.0, 6745.0), strict=True))
PULSES = {"left": 2.0, "right": 4.0, "up": 7.0, "down": 11.0}  # amplitude pulses per second
HASHTAGS = ("#shorts #shapes", "#synthetic", "#motion #sample", "")


def render_audio(rng: np.random.Generator, motion: core.Motion, seconds: float) -> np.ndarray:
    """float32 samples in [-1, 1]: the colour's tone (plus its octave), pulsing at the direction's rate."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = PITCHES[motion.colour]
    tone = np.sin(2 * np.pi * pitch * t + rng.uniform(0, 2 * np.pi))
    if 2 * pitch < SAMPLE_RATE / 2:
        tone += 0.3 * np.sin(2 * np.pi * 2 * pitch * t)
    phase = rng.uniform(0, 2 * np.pi)
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * PULSES[motion.direction] * t + phase)
    loudness = 0.5 if motion.size == "big" else 0.3
    signal = loudness * envelope * tone + rng.normal(0.0, 0.02, size=t.shape)
    return np.clip(signal, -1.0, 1.0).astype(np.float32)


def write_wav(path: str | os.PathLike, samples: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """16-bit mono PCM through the stdlib `wave` module."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(os.fspath(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())


def generate(
    out_dir: str | os.PathLike,
    sizes: dict[str, int],
    scale: float = 1.0,
    seed: int = core.SEED,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Write the `vat` sample (`sizes`: clips per split) into `out_dir`; returns the stamp written last
    (`sample_data.json`). Called by `trainers.core.sample_data.generate_sample_data("vat", ...)`, which
    `ensure_sample_data` wraps in its cache and lock."""
    out = Path(out_dir)
    for root in ROOTS.values():
        (out / root).mkdir(parents=True, exist_ok=True)
    say = progress or (lambda message: None)
    started, clip, total = time.perf_counter(), 0, sum(sizes.values())
    for split_number, (split, n) in enumerate(sizes.items()):
        # Validation clips get distinct (size, colour, shape, direction): each caption names one clip.
        planned = core._plan_motions(
            np.random.default_rng((seed, 101, split_number)), n, distinct=split != "train"
        )
        rows = []
        for i, motion in enumerate(planned):
            rng = np.random.default_rng((seed, 101, split_number, i))
            stem = f"clip{clip}"
            clip += 1
            background = core.BACKGROUNDS[int(rng.integers(len(core.BACKGROUNDS)))]
            core.write_video(
                out / ROOTS["video"] / f"{stem}.mp4", core.render_video(rng, [motion], background, FRAMES)
            )
            write_wav(out / ROOTS["audio"] / f"{stem}.wav", render_audio(rng, motion, FRAMES / core.FPS))
            title = core._caption(rng, motion, background)
            tags = HASHTAGS[int(rng.integers(len(HASHTAGS)))]
            (out / ROOTS["text"] / f"{stem}.txt").write_text(f"{title} {tags}".strip() + "\n")
            rows.append({"video": f"{stem}.mp4", "audio": f"{stem}.wav", "text": f"{stem}.txt"})
            if clip % 100 == 0 or clip == total:
                say(f"{NAME}: {clip}/{total} clips ({time.perf_counter() - started:.1f}s)")
        with open(out / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    (out / core.VOCAB_FILE).write_text("\n".join(core.build_vocab()) + "\n")
    stamp = {
        "name": NAME,
        "format_version": core.FORMAT_VERSION,
        "scale": scale,
        "seed": seed,
        "clips": sizes,
        "resolution": core.RESOLUTION,
        "fps": core.FPS,
        "frames_per_video": FRAMES,
        "audio_sample_rate": SAMPLE_RATE,
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out / core.STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")
    return stamp


__all__ = ["ANNO_FILES", "CSV_COLUMNS", "ROOTS", "generate", "render_audio", "write_wav"]
