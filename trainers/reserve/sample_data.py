"""Sample TVQA and Social-IQ 2.0 data in their real on-disk formats, generated (no downloads).

Every clip has one *concept* (a colour for TVQA, a mood for SiQ2) that shows in all three modalities:
the frames are tinted with the concept's colour, the audio is a tone at the concept's pitch, and a
speaker names it in some subtitle lines. Each question asks for the concept; its answers are sentences
naming different concepts, so a model learns to pick the answer from the frames, the audio or the
subtitles, and a tiny one gets well above chance in a minute on CPU.

Layouts (relative to the data root; what trainers.reserve.prep reads for real data too):

    TVQA  tvqa_qa_release/tvqa_{train,val}.jsonl     q, a0..a4, answer_idx, qid, vid_name, show_name, ts
          tvqa_frames/frames_hq/<show>_frames/<vid>/00001.jpg ...   3 fps
          audios/<show>/<show>_audios/<vid>.wav       (upstream: .mp3; prep reads both)
          tvqa_subtitles/<vid>.srt
    SiQ2  siq2_qa_release/qa_{train,val}.json         JSONL: vid_name, ts, q, a0, a1, qid, answer_idx
          frames/<vid>/<vid>_001.jpg ...             3 fps
          mp3/<vid>.wav                              (upstream: .mp3; prep reads both)
          transcript/<vid>.vtt

Frames are JPEG through Pillow (installed with matplotlib, a core dependency); audio is 16-bit mono
WAV at 8 kHz through the stdlib `wave` module, because writing mp3 needs an encoder we do not ship.
"""

from __future__ import annotations

import json
import logging
import os
import wave
from pathlib import Path

import numpy as np

from trainers.core.sample_data import build_once, default_cache_dir

log = logging.getLogger("trainers.reserve.sample_data")

FORMAT_VERSION = 1
STAMP_FILE = ".complete.json"
FPS = 3
SAMPLE_RATE = 8000
CLIP_SECONDS = 6.0
FRAME_SIZE = (32, 48)  # h, w: small, but not the model's size, so prep really resizes

# (name, RGB, tone in Hz). TVQA asks for colours, SiQ2 for moods; both map to the same three signals.
CONCEPTS = {
    "tvqa": [
        ("red", (220, 40, 40), 300.0),
        ("green", (40, 200, 60), 500.0),
        ("blue", (40, 70, 230), 800.0),
        ("yellow", (230, 220, 40), 1200.0),
        ("purple", (150, 50, 190), 1800.0),
    ],
    "siq2": [
        ("happy", (230, 220, 40), 1200.0),
        ("sad", (40, 70, 230), 300.0),
        ("angry", (220, 40, 40), 1800.0),
        ("calm", (40, 200, 60), 500.0),
    ],
}
SHOWS = [("Friends", "friends"), ("The Big Bang Theory", "bbt"), ("Castle", "castle")]
SPEAKERS = ["sheldon", "rachel", "ross", "penny", "castle", "beckett"]
FILLER = ["well", "okay", "look", "i", "think", "we", "should", "go", "now", "really", "maybe", "here"]
TVQA_QUESTIONS = ["what colour is the room when {s} talks ?", "what colour does {s} see ?"]
SIQ2_QUESTIONS = ["how does the person feel ?", "what is the mood of the speaker ?"]
SPLIT_CLIPS = {"train": 40, "val": 12}  # two questions per clip

QA_FILES = {
    "tvqa": {"train": "tvqa_qa_release/tvqa_train.jsonl", "val": "tvqa_qa_release/tvqa_val.jsonl"},
    "siq2": {"train": "siq2_qa_release/qa_train.json", "val": "siq2_qa_release/qa_val.json"},
}


def sample_root(name: str, scale: float = 1.0, cache_dir: str | os.PathLike | None = None) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    leaf = name if scale == 1.0 else f"{name}-scale{scale:g}"
    return base / f"reserve-v{FORMAT_VERSION}" / leaf


def is_complete(root: Path) -> bool:
    try:
        return json.loads((root / STAMP_FILE).read_text())["format_version"] == FORMAT_VERSION
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_sample_data(name: str, scale: float = 1.0, cache_dir: str | os.PathLike | None = None) -> Path:
    """The root of sample dataset `name` ("tvqa" | "siq2"), generated first if the cache lacks it.

    Safe from many processes at once: one generates under a lock, the others wait and reuse it.
    """
    if name not in CONCEPTS:
        raise ValueError(f"no sample data for {name!r}; valid: {sorted(CONCEPTS)}")
    root = sample_root(name, scale, cache_dir)

    def build(tmp: Path) -> None:
        generate(name, tmp, scale)
        (tmp / STAMP_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION}))

    return build_once(root, build, is_complete, f"sample dataset {name}")


def generate(name: str, root: Path, scale: float = 1.0) -> None:
    """Write sample dataset `name` under `root` (deterministic: the same bytes every time)."""
    rng = np.random.default_rng(0 if name == "tvqa" else 1)
    concepts = CONCEPTS[name]
    for split, n in SPLIT_CLIPS.items():
        rows = []
        for i in range(max(2, round(n * scale))):
            concept = int(rng.integers(len(concepts)))
            if name == "tvqa":
                show, short = SHOWS[i % len(SHOWS)]
                vid = f"{short}_s01e{i // 10 + 1:02d}_seg02_clip_{i % 10:02d}_{split}"
                frames_dir = root / "tvqa_frames" / "frames_hq" / f"{short}_frames" / vid
                audio_path = root / "audios" / short / f"{short}_audios" / f"{vid}.wav"
                sub_path = root / "tvqa_subtitles" / f"{vid}.srt"
                frame_name = "{:05d}.jpg"
            else:
                vid = f"sq{split[0]}{i:03d}xY{int(rng.integers(1000)):03d}"
                frames_dir = root / "frames" / vid
                audio_path = root / "mp3" / f"{vid}.wav"
                sub_path = root / "transcript" / f"{vid}.vtt"
                frame_name = vid + "_{:03d}.jpg"
            _write_frames(frames_dir, frame_name, concepts[concept][1], rng)
            _write_audio(audio_path, concepts[concept][2], rng)
            speaker = SPEAKERS[int(rng.integers(len(SPEAKERS)))]
            cues = _cues(rng, concepts[concept][0], speaker, name)
            sub_path.parent.mkdir(parents=True, exist_ok=True)
            sub_path.write_text(_srt(cues) if name == "tvqa" else _vtt(cues))
            start = float(rng.uniform(0.5, 2.0))
            ts = (
                f"{start:.2f}-{start + float(rng.uniform(2.0, 3.5)):.2f}"
                if name == "tvqa"
                else f"0.00-{CLIP_SECONDS:.2f}"
            )
            for k, template in enumerate(TVQA_QUESTIONS if name == "tvqa" else SIQ2_QUESTIONS):
                rows.append(_question(rng, name, vid, ts, concept, template.format(s=speaker), k, i, split))
                if name == "tvqa":
                    rows[-1]["show_name"] = show
        path = root / QA_FILES[name][split]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _question(rng, name: str, vid: str, ts: str, concept: int, q: str, k: int, i: int, split: str) -> dict:
    concepts = CONCEPTS[name]
    num_answers = 5 if name == "tvqa" else 2
    others = [c for c in range(len(concepts)) if c != concept]
    choices = [concept, *rng.permutation(others)[: num_answers - 1].tolist()]
    order = rng.permutation(num_answers).tolist()
    choices = [choices[j] for j in order]
    if name == "tvqa":
        answers = [f"it is {concepts[c][0]}" for c in choices]
        row = {"q": q, **{f"a{j}": a for j, a in enumerate(answers)}, "answer_idx": choices.index(concept)}
        return {**row, "qid": hash_id(vid, k), "vid_name": vid, "ts": ts}
    answers = [f"they feel {concepts[c][0]}" for c in choices]
    return {
        "vid_name": vid,
        "ts": ts,
        "q": q,
        "a0": answers[0],
        "a1": answers[1],
        "qid": f"{vid}_q{k + 1}_{i}",
        "answer_idx": choices.index(concept),
    }


def hash_id(vid: str, k: int) -> int:
    return sum(ord(ch) * (i + 1) for i, ch in enumerate(vid)) * 10 + k


def _write_frames(folder: Path, pattern: str, rgb: tuple[int, int, int], rng: np.random.Generator) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    h, w = FRAME_SIZE
    for f in range(int(CLIP_SECONDS * FPS)):
        base = np.array(rgb, np.float32) * rng.uniform(0.7, 1.0)
        img = base + rng.normal(0.0, 25.0, (h, w, 3))
        # a grey square wanders around: something that changes between frames but says nothing
        y, x = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        img[y : y + 8, x : x + 8] = 128.0
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            folder / pattern.format(f + 1), quality=90
        )


def _write_audio(path: Path, tone_hz: float, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(CLIP_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    signal = 0.5 * np.sin(2 * np.pi * tone_hz * t + rng.uniform(0, 6.28)) + rng.normal(0, 0.05, t.shape)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SAMPLE_RATE)
        f.writeframes((np.clip(signal, -1, 1) * 32000).astype("<i2").tobytes())


def _cues(rng, word: str, speaker: str, name: str) -> list[tuple[float, float, str]]:
    cues, t = [], 0.2
    while t < CLIP_SECONDS - 0.5:
        n = int(rng.integers(2, 5))
        words = [FILLER[int(j)] for j in rng.integers(len(FILLER), size=n)]
        if rng.random() < 0.6:
            words.insert(int(rng.integers(n + 1)), word)
        text = " ".join(words)
        cues.append((t, min(t + 1.2, CLIP_SECONDS), f"({speaker}:) {text}" if name == "tvqa" else text))
        t += 1.5
    return cues


def _clock(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def _srt(cues) -> str:
    return "".join(
        f"{i + 1}\n{_clock(a, ',')} --> {_clock(b, ',')}\n{text}\n\n" for i, (a, b, text) in enumerate(cues)
    )


def _vtt(cues) -> str:
    return "WEBVTT\n\n" + "".join(f"{_clock(a, '.')} --> {_clock(b, '.')}\n{text}\n\n" for a, b, text in cues)


__all__ = ["CONCEPTS", "QA_FILES", "ensure_sample_data", "generate", "sample_root"]
