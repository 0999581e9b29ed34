"""Frame sampling and decoding for every PyTorch family (numpy + PyAV, no torch).

Two rules shape this module:

* Sampling follows Singularity's ``get_frame_indices``: the video is cut into ``num_frames`` equal
  intervals and one frame is taken from each (``rand``: anywhere in it, for training; ``middle``: its
  centre, for evaluation), or frames are taken at a fixed rate (``fps0.5``). Short videos repeat their
  last frame.
* Decoding touches only what the sample needs. The length and rate come from the container's metadata;
  frames are decoded in order and decoding stops at the last wanted frame; only the wanted frames are
  converted to RGB and kept. When a wanted frame lies deep in the video (``index_threshold`` frames or
  more), the reader first lists the video's packets (demuxing, no decoding: a few milliseconds for a
  thousand frames) to learn every frame's timestamp and where the keyframes are, then seeks to the
  keyframe before a wanted frame whenever that skips frames it would otherwise decode. The same list
  gives the frame count when the metadata lacks it. With that list the reader also knows every
  packet's frame, so it has the decoder skip the non-reference frames it does not want (B-frames that
  no other frame is predicted from: about a third of the decoding time of an x264 video); frames that
  are wanted, and every frame later ones depend on, are decoded as usual, so the pixels are exactly
  those of a full decode. Each decoder, and each conversion to RGB, runs on one thread: a DataLoader
  already runs one reader per worker process.
"""

from __future__ import annotations

import bisect
import contextvars
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

logger = logging.getLogger(__name__)

# Below this frame index, decoding straight from the start is about as cheap as listing the packets.
DEFAULT_INDEX_THRESHOLD = 96

# Timestamps of the packets to decode in full while _decode_frames runs; the decoder may skip any other
# non-reference frame. None: decode everything (no packet list, so frames are identified by counting).
_KEEP_PTS: contextvars.ContextVar[frozenset[int] | None] = contextvars.ContextVar("keep_pts", default=None)


VIDEO_EXTENSIONS: tuple[str, ...] = ("mp4", "avi", "mkv", "webm", "mov", "m4v", "mpg", "mpeg", "gif")


def find_videos(video_dir: Path, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> list[Path]:
    """Video files under ``video_dir`` (recursively), sorted, by extension (case-insensitive)."""
    wanted = {"." + e.lower().lstrip(".") for e in extensions}
    return sorted(p for p in video_dir.rglob("*") if p.is_file() and p.suffix.lower() in wanted)


class VideoReadError(RuntimeError):
    """A video file could not be opened or decoded; the message names the file."""


def frame_indices(
    num_frames: int,
    vlen: int,
    sample: str = "rand",
    rng: np.random.Generator | None = None,
    input_fps: float | None = None,
    max_num_frames: int | None = None,
) -> list[int]:
    """Which frames of a ``vlen``-frame video to use.

    ``sample`` is ``rand`` (a random frame inside each of ``num_frames`` equal intervals), ``middle``
    (the centre frame of each interval) or ``fpsX`` (frames every ``1/X`` seconds, each at the centre of
    its window; needs ``input_fps``; at most ``max_num_frames`` when given). ``rand`` and ``middle``
    always return ``num_frames`` indices: a video shorter than that uses every frame and repeats the
    last. ``rng`` is a numpy Generator; without one, numpy's global state is used (a DataLoader
    ``worker_init_fn`` seeds it per worker).
    """
    if vlen < 1:
        raise ValueError(f"cannot sample frames from a video with {vlen} frames")
    if sample in ("rand", "middle"):
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        n = min(num_frames, vlen)
        bounds = np.linspace(0, vlen, num=n + 1).astype(int)
        starts, ends = bounds[:-1], bounds[1:]  # interval i is [starts[i], ends[i])
        if sample == "rand":
            draw = rng.integers if rng is not None else np.random.randint
            indices = [int(draw(s, e)) for s, e in zip(starts, ends, strict=True)]
        else:
            indices = [int((s + e - 1) // 2) for s, e in zip(starts, ends, strict=True)]
        return indices + [indices[-1]] * (num_frames - n)
    if sample.startswith("fps"):
        try:
            output_fps = float(sample[3:])
        except ValueError:
            output_fps = -1.0
        if not output_fps > 0:
            raise ValueError(
                f"bad sample type {sample!r}: expected fps<rate> with a positive rate, e.g. fps0.5"
            )
        if not input_fps or input_fps <= 0:
            raise ValueError(f"sample type {sample!r} needs the video's frame rate (input_fps)")
        delta = 1.0 / output_fps  # seconds between sampled frames
        duration = vlen / input_fps
        seconds = np.arange(delta / 2, duration + delta / 2, delta)
        indices = [int(i) for i in np.around(seconds * input_fps) if i < vlen]
        if not indices:  # a video shorter than half a window: its middle frame stands for it
            indices = [(vlen - 1) // 2]
        if max_num_frames is not None and max_num_frames > 0:
            indices = indices[:max_num_frames]
        return indices
    raise ValueError(f"unknown sample type {sample!r}: expected rand, middle or fps<rate> (e.g. fps0.5)")


def read_frames(
    path: str | os.PathLike,
    num_frames: int,
    sample: str = "rand",
    rng: np.random.Generator | None = None,
    max_frames_decoded: int | None = None,
    *,
    index_threshold: int = DEFAULT_INDEX_THRESHOLD,
) -> tuple[np.ndarray, list[int], int]:
    """Sample and decode ``num_frames`` frames of a video.

    Returns ``(frames, indices, vlen)``: ``frames`` is uint8 ``(T, H, W, 3)`` RGB in the order of
    ``indices`` (repeats included), ``vlen`` the number of frames in the video. ``max_frames_decoded``
    caps how many frames ``fpsX`` sampling may return (upstream's ``max_num_frames``); it does not
    apply to ``rand``/``middle``, which always return ``num_frames``. If the container's frame count
    overstates the real one, wanted frames past the end repeat the last decoded frame.
    """
    chosen: list[int] = []

    def choose(vlen: int, fps: float | None) -> list[int]:
        chosen[:] = frame_indices(
            num_frames, vlen, sample, rng=rng, input_fps=fps, max_num_frames=max_frames_decoded
        )
        return chosen

    frames, vlen = _read(path, choose, pad_short=True, index_threshold=index_threshold)
    return frames, chosen, vlen


def read_clip_frames(
    path: str | os.PathLike,
    indices: Sequence[int],
    *,
    index_threshold: int = DEFAULT_INDEX_THRESHOLD,
) -> np.ndarray:
    """Decode the frames at explicit ``indices`` (any order, repeats allowed) as uint8 ``(T, H, W, 3)``.

    For families that choose their own frames (clips, strides). An index at or past the end of the
    video is an error.
    """
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("read_clip_frames needs at least one frame index")
    if min(indices) < 0:
        raise ValueError(f"negative frame index {min(indices)} for {os.fspath(path)}")
    return _read(path, lambda vlen, fps: indices, pad_short=False, index_threshold=index_threshold)[0]


def read_chosen_frames(
    path: str | os.PathLike,
    choose: Callable[[int, float | None], Sequence[int]],
    *,
    index_threshold: int = DEFAULT_INDEX_THRESHOLD,
) -> tuple[np.ndarray, list[int], int]:
    """Decode the frames that ``choose(vlen, fps)`` picks, opening the video once.

    Returns ``(frames, indices, vlen)``; the rules for indices are those of ``read_clip_frames``.
    """
    chosen: list[int] = []

    def checked(vlen: int, fps: float | None) -> list[int]:
        chosen[:] = [int(i) for i in choose(vlen, fps)]
        if not chosen:
            raise ValueError(f"no frame chosen from {os.fspath(path)}")
        if min(chosen) < 0:
            raise ValueError(f"negative frame index {min(chosen)} for {os.fspath(path)}")
        return chosen

    frames, vlen = _read(path, checked, pad_short=False, index_threshold=index_threshold)
    return frames, chosen, vlen


def video_info(path: str | os.PathLike) -> tuple[int, float | None]:
    """``(vlen, fps)`` of a video from its metadata (a packet count when the frame count is missing)."""
    with _open(path) as container:
        stream = container.streams.video[0]
        vlen = int(stream.frames or 0) or len(_PacketIndex.scan(path).pts)
        return vlen, _frame_rate(stream, vlen)


# --- internals -------------------------------------------------------------------------------------


# Opening a file runs FFmpeg's stream probe, which decodes the first frame of an H.264 stream to learn
# its pixel format. An MP4/MOV header already holds what this module reads (frame count, rate, time
# base) and the decoder finds the pixel format by itself, so for those files the probe is told to
# decode nothing and stop after the first packet: opening a 320x240 video then costs 0.35 ms instead
# of 2.2 ms (the probe decoded a keyframe), and the frames decoded afterwards are the same.
_MOV_PROBE = {"options": {"probesize": "32"}, "stream_options": [{"skip_frame": "all"}]}


def _is_mov(source) -> bool:
    """An ISO base media file (mp4, m4v, mov): its first box is `ftyp` (or `moov`, `wide`, `mdat`, `free`)."""
    try:
        if hasattr(source, "read"):
            start = source.tell()
            head = source.read(12)
            source.seek(start)
        else:
            with open(source, "rb") as f:
                head = f.read(12)
    except OSError:
        return False
    return head[4:8] in (b"ftyp", b"moov", b"wide", b"mdat", b"free")


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    name = os.fspath(path)
    # An in-memory video (a file object that names itself through __fspath__, e.g. ClipBERT's LMDB store)
    # is decoded from its bytes; anything else is a path.
    source = path if hasattr(path, "read") else name
    try:
        container = av.open(source, mode="r", **(_MOV_PROBE if _is_mov(source) else {}))
    except (av.FFmpegError, OSError) as e:
        raise VideoReadError(f"cannot open video {name}: {getattr(e, 'strerror', None) or e}") from e
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"no video stream in {name}")
    container.streams.video[0].codec_context.thread_count = 1
    return container


def _read(path, choose, pad_short: bool, index_threshold: int) -> tuple[np.ndarray, int]:
    """Open once: length and rate, ``choose(vlen, fps)``, packet list if worth it, decode."""
    with _open(path) as container:
        stream = container.streams.video[0]
        vlen = int(stream.frames or 0)
        packets = None
        if vlen <= 0:  # no frame count in the metadata (e.g. Matroska): count packets
            packets = _PacketIndex.scan(path, container)
            vlen = len(packets.pts)
        if vlen <= 0:
            raise VideoReadError(f"no frames in video {os.fspath(path)}")
        indices = choose(vlen, _frame_rate(stream, vlen))
        if max(indices) >= index_threshold and packets is None:
            packets = _PacketIndex.scan(path, container)
        return _decode_at(path, container, stream, indices, packets, pad_short), vlen


def _frame_rate(stream, vlen: int) -> float | None:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if rate:
        return float(rate)
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
        return vlen / seconds if seconds > 0 else None
    return None


@dataclass
class _PacketIndex:
    """Every frame's timestamp in presentation order, and which frames are keyframes."""

    pts: list[int]  # pts[i] is the timestamp of frame i
    keyframes: list[int]  # frame indices, ascending

    timed: bool = True  # False: the container has no timestamps, frames can only be counted

    @classmethod
    def scan(cls, path, container=None) -> _PacketIndex:
        """Demux (no decoding) the whole video stream: one packet per frame.

        With an open ``container``, scans it and seeks it back to the start.
        """
        if container is None:
            with _open(path) as own:
                return cls.scan(path, own)
        stream = container.streams.video[0]
        try:
            packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size > 0]
            container.seek(
                0 if stream.start_time is None else stream.start_time, stream=stream, backward=True
            )
        except av.FFmpegError as e:
            raise VideoReadError(f"cannot read video {os.fspath(path)}: {e}") from e
        if any(pts is None for pts, _ in packets):  # no timestamps: counting still works
            return cls(list(range(len(packets))), [0], timed=False)
        packets.sort()
        return cls([pts for pts, _ in packets], [i for i, (_, key) in enumerate(packets) if key] or [0])

    def index_of(self, pts: int) -> int:
        """Frame index of a decoded frame's timestamp (the nearest frame at or before it)."""
        return max(0, bisect.bisect_right(self.pts, pts) - 1)

    def keyframe_before(self, index: int) -> int:
        return self.keyframes[max(0, bisect.bisect_right(self.keyframes, index) - 1)]


def _rgb(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame as uint8 RGB ``(H, W, 3)``, converted on this thread.

    FFmpeg's scaler otherwise starts worker threads for the conversion, and a process forked while
    such threads exist (a DataLoader worker) has the scaler's state without its threads and waits
    forever the first time it converts a frame.
    """
    return frame.to_ndarray(format="rgb24", threads=1)


def _decode_frames(container, stream) -> Iterator[av.VideoFrame]:
    """Frames in presentation order from the container's current position (tests wrap this to count)."""
    keep = _KEEP_PTS.get()
    return container.decode(stream) if keep is None else _decode_skipping(container, stream, keep)


def _decode_skipping(container, stream, keep: frozenset[int]) -> Iterator[av.VideoFrame]:
    """``container.decode`` that lets the decoder drop the non-reference frames not in ``keep``."""
    ctx = stream.codec_context
    try:
        for packet in container.demux(stream):
            # The switch is read per packet: a wanted frame is decoded (and output) whatever its type.
            ctx.skip_frame = "DEFAULT" if packet.pts is None or packet.pts in keep else "NONREF"
            yield from packet.decode()
    finally:
        ctx.skip_frame = "DEFAULT"


def _decode_at(path, container, stream, indices, packets: _PacketIndex | None, pad_short: bool) -> np.ndarray:
    """The frames at ``indices``, decoding forward and, with a packet index, seeking past long gaps."""
    wanted = sorted(set(indices))
    wanted_set = set(wanted)
    kept: dict[int, np.ndarray] = {}
    frames = None
    # With timestamps a frame's index comes from its timestamp, not from counting: the decoder skips
    # unwanted non-reference frames, and a seek lands on a keyframe.
    timed = packets is not None and packets.timed
    by_pts = timed
    pos = -1  # index of the last frame taken from the decoder
    last_frame = None
    keep_token = _KEEP_PTS.set(
        frozenset(packets.pts[i] for i in wanted if i < len(packets.pts)) if timed else None
    )
    try:
        for target in wanted:
            if target in kept:
                continue
            keyframe = packets.keyframe_before(target) if packets and target < len(packets.pts) else 0
            if keyframe > pos + 1:
                # Restarting at the keyframe skips decoding frames pos+1 .. keyframe-1.
                if frames is not None:
                    frames.close()
                container.seek(packets.pts[keyframe], stream=stream, backward=True, any_frame=False)
                frames, by_pts = _decode_frames(container, stream), True
                pos = keyframe - 1  # where counting resumes should a frame lack its timestamp
            elif frames is None:
                frames = _decode_frames(container, stream)
            for frame in frames:
                pos = packets.index_of(frame.pts) if by_pts and frame.pts is not None else pos + 1
                last_frame = frame
                if pos in wanted_set and pos not in kept:
                    kept[pos] = _rgb(frame)
                if pos >= target:
                    if target not in kept:  # a frame without its own timestamp: take the next one
                        kept[target] = _rgb(frame)
                    break
            else:
                break  # end of stream
    except av.FFmpegError as e:
        raise VideoReadError(f"cannot decode video {os.fspath(path)}: {e}") from e
    finally:
        if frames is not None:
            frames.close()
        _KEEP_PTS.reset(keep_token)

    missing = [i for i in wanted if i not in kept]
    if missing:
        if not pad_short or last_frame is None:
            raise VideoReadError(
                f"video {os.fspath(path)} has no frame {missing[0]} (decoding ended after frame {pos})"
            )
        logger.debug("%s ends at frame %d; repeating it for frames %s", os.fspath(path), pos, missing)
        tail = _rgb(last_frame)
        kept.update(dict.fromkeys(missing, tail))
    return np.stack([kept[i] for i in indices])
