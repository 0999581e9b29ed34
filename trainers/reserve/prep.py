"""Turn TVQA / Social-IQ 2.0 videos, audio, subtitles and QA files into the records the trainer streams.

    python -m trainers.reserve.prep --dataset tvqa|siq2 --data-root DIR --out DIR_OR_GS_URL \\
        [--preset tiny|base|large] [--splits train,val] [--examples-per-shard 256] [--on-bad-input skip|fail]

Upstream's segment layout (finetune/tvqa/prep_data.py, the SiQ fork's prep_data_siq2.py): `num_segments`
segments of `segment_seconds` centred on the midpoint of the question's `ts`, each with the frame at its
middle (3 fps frames), the log-mel spectrogram of its audio split into `num_subsegments` x `seq_length`
frames (+ a playback-speed channel, 1.0 = normal speed), and the subtitle words whose cue midpoint falls
in it. Every answer becomes two token sequences, [question, MASK, answer, then per segment the audio
(AUDIOSPAN runs) or the subtitles], each token with its segment index (0 for the question, 1.. for
segments). Upstream also prefixes "{start%} to {end%}" to the question; we do not.

Records: `<out>/<split>-<i>-of-<n>.npz` shards (numpy, no tensorflow) holding stacked arrays
images uint8 [N, S, H, W, 3], audio_clips float16 [N, S, A, T, mels + 1], audio_seqs / textonly_seqs
int32 [N, C, L, 2], labels int32 [N], qid str [N]; then `<out>/meta.json` (layout, vocabulary, shard names
and sizes), written last: records without it are incomplete and never read. Everything goes through
trainers/core/storage.py, so `--out` may be a gs:// URL.

Tokenizer: upstream's BPE vocabulary (lowercase_encoder.json) cannot be downloaded here, so prep builds a
word vocabulary from the training split (lowercased words and punctuation, most frequent first, ties
alphabetical), keeping upstream's special ids 0-6 (PAD, START, END, MASK, MASKAUDIO, AUDIOSPAN, LTOVPOOL),
UNK at 7 and 8-9 reserved; words start at 10. The same data always gives the same vocabulary.

Malformed inputs (a bad JSON line, a missing field, a bad timestamp, missing frames or audio, an
unparsable subtitle cue) are reported with file and line; `--on-bad-input skip` drops the question and
goes on, `fail` stops at the first. A summary line counts what was skipped.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import json
import logging
import math
import re
import sys
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainers.core import storage
from trainers.reserve.config import AUDIOSPAN, MASK, TASKS, TrainConfig

log = logging.getLogger("trainers.reserve.prep")

RECORDS_FORMAT = 1
UNK = 7
FIRST_WORD = 10
FPS = 3.0
META = "meta.json"
_WORD = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")
_SRT_TIME = re.compile(r"^\s*(\d+):(\d\d):(\d\d)[,.](\d{1,3})\s*-->\s*(\d+):(\d\d):(\d\d)[,.](\d{1,3})")
_VTT_TIME = re.compile(r"^\s*(?:(\d+):)?(\d\d):(\d\d)\.(\d{3})\s*-->\s*(?:(\d+):)?(\d\d):(\d\d)\.(\d{3})")
# TVQA's show_name -> the short name of its frame and audio folders.
SHOW_DIRS = {
    "The Big Bang Theory": "bbt",
    "Castle": "castle",
    "Friends": "friends",
    "Grey's Anatomy": "grey",
    "House M.D.": "house",
    "How I Met You Mother": "met",
    "How I Met Your Mother": "met",
}
QA_FIELDS = {
    "tvqa": ("q", "a0", "a1", "a2", "a3", "a4", "answer_idx", "qid", "vid_name", "show_name", "ts"),
    "siq2": ("vid_name", "ts", "q", "a0", "a1", "qid", "answer_idx"),
}


class BadInput(ValueError):
    """One input that cannot be used; `str()` is `file:line: what is wrong`."""

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Layout:
    """What a record holds; derived from the model config, stored in meta.json and checked on load."""

    num_segments: int
    segment_seconds: float
    frame_hw: tuple[int, int]
    num_subsegments: int
    spec_frames: int  # per sub-segment
    num_mels: int
    audio_tokens: int  # AUDIOSPAN tokens per sub-segment
    lang_seq_len: int
    num_answers: int
    vocab_size: int

    @classmethod
    def of(cls, cfg: TrainConfig) -> Layout:
        m = cfg.model
        grid = m.vision.output_grid
        return cls(
            num_segments=m.segments.num_segments,
            segment_seconds=cfg.segment_seconds,
            frame_hw=(grid[0] * m.vision.patch_size, grid[1] * m.vision.patch_size),
            num_subsegments=m.audio.num_subsegments,
            spec_frames=m.audio.seq_length,
            num_mels=m.audio.num_mels,
            audio_tokens=m.audio.token_length,
            lang_seq_len=m.segments.lang_seq_len,
            num_answers=m.num_answers,
            vocab_size=m.vocab_size,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["frame_hw"] = list(self.frame_hw)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        return cls(**{**d, "frame_hw": tuple(d["frame_hw"])})


# --- inputs -----------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def read_qa(path: Path, dataset: str) -> Iterator[tuple[int, dict[str, Any] | BadInput]]:
    """(line number, question) for every non-empty line; a BadInput in place of a malformed one."""
    num_answers = TASKS[dataset]
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                yield n, BadInput(path, n, f"not a JSON object ({e.msg})")
                continue
            if not isinstance(row, dict):
                yield n, BadInput(path, n, "not a JSON object")
                continue
            missing = [k for k in QA_FIELDS[dataset] if k not in row]
            if missing:
                yield (
                    n,
                    BadInput(
                        path,
                        n,
                        f"missing field(s) {missing}; a {dataset} question needs {list(QA_FIELDS[dataset])}",
                    ),
                )
                continue
            try:
                row["answer_idx"] = int(row["answer_idx"])
                start, end = (float(x) for x in str(row["ts"]).split("-"))
            except ValueError:
                yield (
                    n,
                    BadInput(
                        path,
                        n,
                        f"bad ts {row['ts']!r} or answer_idx {row['answer_idx']!r}; want ts 'start-end' in seconds, answer_idx an int",
                    ),
                )
                continue
            if not 0 <= row["answer_idx"] < num_answers:
                yield n, BadInput(path, n, f"answer_idx {row['answer_idx']} is not in 0..{num_answers - 1}")
                continue
            row["_ts"] = (start, max(start, end))
            yield n, row


def parse_subtitles(path: Path) -> list[tuple[float, float, str]]:
    """Cues (start s, end s, text) of an .srt or .vtt file; BadInput names the line of a broken cue."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    pattern = _VTT_TIME if path.suffix == ".vtt" else _SRT_TIME
    cues: list[tuple[float, float, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if "-->" not in line:
            i += 1
            continue
        m = pattern.match(line)
        if m is None:
            raise BadInput(
                path,
                i + 1,
                f"bad cue timing {line!r}; want HH:MM:SS{',' if pattern is _SRT_TIME else '.'}mmm --> HH:MM:SS...",
            )
        g = [int(x) if x else 0 for x in m.groups()]
        start = g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000
        end = g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000
        text = []
        i += 1
        while i < len(lines) and lines[i].strip():
            text.append(lines[i].strip())
            i += 1
        cues.append((start, end, " ".join(text)))
    return cues


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the sample rate: WAV through `wave`, anything else (upstream's
    mp3) through PyAV."""
    if path.suffix == ".wav":
        with wave.open(str(path), "rb") as f:
            width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
            raw = f.readframes(f.getnframes())
        if width != 2:
            raise BadInput(path, None, f"{8 * width}-bit WAV; want 16-bit PCM")
        samples = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
        return samples.reshape(-1, channels).mean(1), rate
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.rate
        chunks = [frame.to_ndarray().astype(np.float32) for frame in container.decode(stream)]
    data = np.concatenate([c.reshape(c.shape[0], -1) if c.ndim > 1 else c[None] for c in chunks], axis=1)
    if data.dtype.kind == "i" or np.abs(data).max(initial=0) > 1.5:
        data = data / 32768.0
    return data.mean(0), rate


def mel_filters(num_mels: int, n_fft: int, rate: int) -> np.ndarray:
    """Triangular mel filterbank [num_mels, n_fft // 2 + 1] between 20 Hz and Nyquist."""

    def mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def hz(m):
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(20.0), mel(rate / 2), num_mels + 2))
    freqs = np.linspace(0, rate / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    return np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid))).astype(np.float32)


def log_mel(samples: np.ndarray, rate: int, num_frames: int, num_mels: int) -> np.ndarray:
    """[num_frames, num_mels] log-mel spectrogram of `samples` (frames spread evenly over them)."""
    hop = max(1, len(samples) // num_frames)
    n_fft = 1 << max(6, math.ceil(math.log2(2 * hop)))
    padded = np.pad(samples, (n_fft // 2, n_fft // 2))
    window = np.hanning(n_fft).astype(np.float32)
    starts = (np.arange(num_frames) * hop).clip(0, max(0, len(padded) - n_fft))
    frames = (
        np.stack([padded[s : s + n_fft] for s in starts])
        if len(padded) >= n_fft
        else np.zeros((num_frames, n_fft), np.float32)
    )
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    spec = np.log(power @ mel_filters(num_mels, n_fft, rate).T + 1e-6)
    return ((spec + 5.0) / 5.0).astype(np.float32)  # roughly zero-mean, unit scale


def load_frame(path: Path, hw: tuple[int, int]) -> np.ndarray:
    """An RGB frame resized to cover `hw` and centre-cropped: uint8 [h, w, 3]."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = max(hw[0] / img.height, hw[1] / img.width)
        size = (max(hw[1], round(img.width * scale)), max(hw[0], round(img.height * scale)))
        img = img.resize(size, Image.BILINEAR)
        left, top = (size[0] - hw[1]) // 2, (size[1] - hw[0]) // 2
        return np.asarray(img.crop((left, top, left + hw[1], top + hw[0])), np.uint8)


# --- where each dataset keeps things --------------------------------------------------------------


def media_paths(dataset: str, root: Path, row: dict[str, Any]) -> tuple[list[Path], Path | None, Path]:
    """(sorted frame files, audio file or None, subtitle file) of a question's clip."""
    vid = str(row["vid_name"])
    if dataset == "tvqa":
        show = SHOW_DIRS.get(row["show_name"], vid.split("_")[0])
        frames = sorted((root / "tvqa_frames" / "frames_hq" / f"{show}_frames" / vid).glob("*.jpg"))
        audio_dir = root / "audios" / show / f"{show}_audios"
        subs = root / "tvqa_subtitles" / f"{vid}.srt"
    else:
        frames = sorted((root / "frames" / vid).glob("*.jpg"))
        audio_dir = root / "mp3"
        subs = root / "transcript" / f"{vid}.vtt"
    audio = next((p for p in (audio_dir / f"{vid}.mp3", audio_dir / f"{vid}.wav") if p.exists()), None)
    return frames, audio, subs


# --- records ----------------------------------------------------------------------------------------


def segment_window(ts: tuple[float, float], duration: float, layout: Layout) -> list[tuple[float, float]]:
    """The segments' (start, end) times: centred on the ts midpoint, moved to stay inside the clip."""
    total = layout.num_segments * layout.segment_seconds
    start = (ts[0] + ts[1]) / 2 - total / 2
    start = max(0.0, min(start, duration - total))
    return [
        (start + i * layout.segment_seconds, start + (i + 1) * layout.segment_seconds)
        for i in range(layout.num_segments)
    ]


def make_record(
    dataset: str,
    root: Path,
    qa_path: Path,
    line: int,
    row: dict[str, Any],
    layout: Layout,
    vocab: dict[str, int],
) -> dict[str, Any]:
    frames, audio_path, subs_path = media_paths(dataset, root, row)
    vid = row["vid_name"]
    if not frames:
        raise BadInput(
            qa_path,
            line,
            f"no frames for {vid!r} (looked for .jpg files where {dataset} keeps them under {root})",
        )
    if audio_path is None:
        raise BadInput(qa_path, line, f"no audio for {vid!r} (.mp3 or .wav)")
    if not subs_path.exists():
        raise BadInput(qa_path, line, f"no subtitles for {vid!r} at {subs_path}")
    cues = parse_subtitles(subs_path)
    try:
        samples, rate = read_audio(audio_path)
    except (OSError, EOFError, wave.Error) as e:
        raise BadInput(audio_path, None, f"unreadable audio ({e})") from None
    duration = len(frames) / FPS
    segments = segment_window(row["_ts"], duration, layout)
    images, specs, sub_tokens = [], [], []
    per_segment = layout.num_subsegments * layout.spec_frames
    for t0, t1 in segments:
        index = min(len(frames) - 1, max(0, int((t0 + t1) / 2 * FPS)))
        try:
            images.append(load_frame(frames[index], layout.frame_hw))
        except OSError as e:
            raise BadInput(frames[index], None, f"unreadable frame ({e})") from None
        chunk = samples[int(t0 * rate) : int(t1 * rate)]
        if len(chunk) < int((t1 - t0) * rate):
            chunk = np.pad(chunk, (0, int((t1 - t0) * rate) - len(chunk)))
        spec = log_mel(chunk, rate, per_segment, layout.num_mels)
        speed = np.ones((per_segment, 1), np.float32)
        specs.append(np.concatenate([spec, speed], 1).reshape(layout.num_subsegments, layout.spec_frames, -1))
        text = " ".join(c[2] for c in cues if t0 <= (c[0] + c[1]) / 2 < t1)
        sub_tokens.append([vocab.get(w, UNK) for w in words(text)])
    question = [vocab.get(w, UNK) for w in words(row["q"])]
    L, S = layout.lang_seq_len, layout.num_segments
    audio_len = S * layout.num_subsegments * layout.audio_tokens
    audio_seqs = np.zeros((layout.num_answers, L, 2), np.int32)
    text_seqs = np.zeros((layout.num_answers, L, 2), np.int32)
    for k in range(layout.num_answers):
        answer = [vocab.get(w, UNK) for w in words(row[f"a{k}"])]
        room = L - audio_len - 1  # the prefix must leave the audio runs whole
        prefix = (question[: max(1, room - len(answer))] + [MASK] + answer)[: max(1, room + 1)]
        prefix_pairs = [(t, 0) for t in prefix]
        audio = prefix_pairs + [(AUDIOSPAN, s + 1) for s in range(S) for _ in range(audio_len // S)]
        budget = max(0, L - len(prefix_pairs)) // S
        text = prefix_pairs + [(t, s + 1) for s in range(S) for t in sub_tokens[s][:budget]]
        audio_seqs[k, : len(audio[:L])] = audio[:L]
        text_seqs[k, : len(text[:L])] = text[:L]
    return {
        "images": np.stack(images),
        "audio_clips": np.stack(specs).astype(np.float16),
        "audio_seqs": audio_seqs,
        "textonly_seqs": text_seqs,
        "labels": np.int32(row["answer_idx"]),
        "qid": str(row["qid"]),
    }


def build_vocab(dataset: str, root: Path, qa_path: Path, size: int) -> list[str]:
    """Words of the training questions, answers and their clips' subtitles, most frequent first."""
    counts: collections.Counter[str] = collections.Counter()
    seen_subs: set[Path] = set()
    for _, row in read_qa(qa_path, dataset):
        if isinstance(row, BadInput):
            continue
        for key in ["q"] + [f"a{k}" for k in range(TASKS[dataset])]:
            counts.update(words(str(row[key])))
        subs = media_paths(dataset, root, row)[2]
        if subs not in seen_subs and subs.exists():
            seen_subs.add(subs)
            try:
                counts.update(w for cue in parse_subtitles(subs) for w in words(cue[2]))
            except BadInput:
                pass  # reported when its question is prepared
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [w for w, _ in ranked[: max(0, size - FIRST_WORD)]]


def _npz(records: list[dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    arrays = {k: np.stack([r[k] for r in records]) for k in records[0] if k != "qid"}
    np.savez(buf, qid=np.array([r["qid"] for r in records]), **arrays)
    return buf.getvalue()


def _write_shard(out: str, split: str, index: int, records: list[dict[str, Any]]) -> str:
    name = f"{split}-{index:05d}.npz"
    storage.write_bytes(storage.join(out, name), _npz(records))
    return name


def prepare(
    dataset: str,
    data_root: str | Path,
    out: str,
    layout: Layout,
    anno: dict[str, str],
    splits: list[str] | None = None,
    examples_per_shard: int = 256,
    on_bad_input: str = "skip",
) -> dict[str, Any]:
    """Prepare every split of `anno` (split -> QA file relative to data_root) into records under `out`.

    Returns the meta.json payload. Raises BadInput at the first malformed input when on_bad_input is
    "fail"; with "skip" each is logged (file and line) and counted.
    """
    if dataset not in TASKS:
        raise ValueError(f"dataset={dataset!r}; valid: {sorted(TASKS)}")
    if on_bad_input not in ("skip", "fail"):
        raise ValueError(f"on_bad_input={on_bad_input!r}; valid: skip, fail")
    root = Path(data_root).expanduser()
    splits = splits or list(anno)
    if "train" not in anno:
        raise ValueError(f"dataset {dataset}: anno has no 'train' split to build the vocabulary from")
    vocab_words = build_vocab(dataset, root, root / anno["train"], layout.vocab_size)
    vocab = {w: FIRST_WORD + i for i, w in enumerate(vocab_words)}
    meta: dict[str, Any] = {
        "format": RECORDS_FORMAT,
        "dataset": dataset,
        "layout": layout.to_dict(),
        "vocab": vocab_words,
        "splits": {},
    }
    for split in splits:
        if split not in anno:
            raise ValueError(f"split {split!r} is not in the dataset's anno; valid: {sorted(anno)}")
        qa_path = root / anno[split]
        if not qa_path.exists():
            raise FileNotFoundError(f"{qa_path} does not exist; point --data-root at the {dataset} data")
        records, shards, counts, skipped = [], [], [], 0

        for line, row in read_qa(qa_path, dataset):
            try:
                if isinstance(row, BadInput):
                    raise row
                records.append(make_record(dataset, root, qa_path, line, row, layout, vocab))
            except BadInput as e:
                if on_bad_input == "fail":
                    raise
                log.warning("skipped: %s", e)
                skipped += 1
                continue
            if len(records) == examples_per_shard:
                shards.append(_write_shard(out, split, len(shards), records))
                counts.append(len(records))
                records = []
        if records:
            shards.append(_write_shard(out, split, len(shards), records))
            counts.append(len(records))
        total = sum(counts)
        print(
            f"prep {dataset} {split}: {total} records in {len(shards)} shard(s) -> {out}; skipped {skipped} bad input(s)",
            flush=True,
        )
        meta["splits"][split] = {"shards": shards, "counts": counts, "skipped": skipped}
    storage.write_text(storage.join(out, META), json.dumps(meta))  # last: the records are complete
    return meta


def main(argv: list[str] | None = None) -> int:
    from trainers.reserve.config import resolve

    parser = argparse.ArgumentParser(
        prog="python -m trainers.reserve.prep", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--dataset", required=True, choices=sorted(TASKS))
    parser.add_argument(
        "--data-root", required=True, help="the dataset's root (QA files, frames, audio, subtitles)"
    )
    parser.add_argument(
        "--out", required=True, help="where the records go: a directory or gs://bucket/prefix"
    )
    parser.add_argument(
        "--preset",
        default="base",
        choices=["tiny", "base", "large"],
        help="model whose layout the records fit",
    )
    parser.add_argument("--splits", default=None, help="comma-separated splits (default: train,val)")
    parser.add_argument("--examples-per-shard", type=int, default=256)
    parser.add_argument("--on-bad-input", default="skip", choices=["skip", "fail"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    from trainers.reserve.sample_data import QA_FILES

    cfg = resolve({"preset": args.preset}, {"name": args.dataset, "data_root": args.data_root})
    try:
        prepare(
            args.dataset, args.data_root, args.out, Layout.of(cfg), QA_FILES[args.dataset],
            args.splits.split(",") if args.splits else None, args.examples_per_shard, args.on_bad_input,
        )  # fmt: skip
    except (BadInput, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
