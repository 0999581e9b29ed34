"""Re-encode a folder of videos for sampled reading: the preparation step upstream calls compress.

Singularity and ALPRO train on videos they re-encoded first (Singularity's ``preprocess/compress.py``:
ffmpeg at 2 fps, shorter side 224 or 360, DiDeMo cut to its first 30 s, audio dropped). This command
does the same through PyAV (no ffmpeg binary needed), and encodes the result so that the trainers'
samplers decode little of it:

* a keyframe every ``--keyframe-seconds`` (default 0.5 s): a sampled frame is decoded from the
  keyframe before it, so this bounds what each frame costs wherever it lies;
* B-frames that no frame is predicted from (``--bframes``, default 7, x264's ``b-pyramid=none``,
  ``b-adapt=0``): the reader (`trainers/core/video.py`) has the decoder skip the non-reference frames
  it does not want, so between a keyframe and a wanted frame one frame in ``bframes + 1`` is decoded.

Keyframes are the costly part of both the file and its decoding. On the benchmark's 30-s videos
(``benchmarks/decode_sampling.py``), ClipBERT's 8 clips x 2 frames decode 5.6x faster than the whole
video with a keyframe every 0.5 s, 4.2x with one every second and 3.0x with one every 8.3 s (x264's
default interval); the files are 1.09, 0.76 and 0.37 MB. The default is the shortest of these
intervals, for the samplings that spread the most frames; ``--keyframe-seconds 1`` or ``2`` trade
decoding for size.

    python -m trainers.core.compress <video_dir> <out_dir> [--fps 2] [--short-side 224]
        [--max-seconds 30] [--keyframe-seconds 0.5] [--bframes 7] [--crf 23] [--preset medium]
        [--audio drop|copy] [--jobs N] [--on-bad-input skip|fail] [--overwrite] [--mp4-names]

Every video under ``video_dir`` (recursively) becomes an mp4 (h264, yuv420p, constant frame rate,
index at the front) at the same path under ``out_dir``, under the same name so that the annotation
files still name it (readers go by a file's content, not its extension), or as ``<stem>.mp4`` with
``--mp4-names``. A video is written to ``<name>.partial`` and renamed when complete, so an
interrupted run leaves no truncated video, and running the command again only does the videos not
done yet. The frame rate is kept unless ``--fps`` is given (each output frame is the input frame
nearest its time, as ffmpeg's fps filter does); sizes are only ever scaled down. A video that cannot
be read is named with the reason and skipped (``--on-bad-input skip``) or stops the run (``fail``).
No torch here.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path

import av
from av.video.frame import PictureType

from trainers.core.video import VIDEO_EXTENSIONS, VideoReadError, find_videos

X264_PRESETS = (
    "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo"
)  # fmt: skip
PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class CompressOptions:
    """How each video is re-encoded (the command's flags)."""

    fps: Fraction | None = None  # None: keep the input's average frame rate
    short_side: int | None = None  # None: keep the size (rounded down to even)
    max_seconds: float | None = None  # None: the whole video
    keyframe_seconds: float = 0.5
    bframes: int = 7
    crf: float = 23.0  # x264's default, what upstream's ffmpeg call gets
    preset: str = "medium"
    audio: str = "drop"  # or "copy": the first audio stream's packets, unchanged

    def __post_init__(self) -> None:
        problems = []
        if self.fps is not None and self.fps <= 0:
            problems.append(f"fps={self.fps} must be above 0")
        if self.short_side is not None and self.short_side < 2:
            problems.append(f"short_side={self.short_side} must be 2 or more")
        if self.max_seconds is not None and self.max_seconds <= 0:
            problems.append(f"max_seconds={self.max_seconds} must be above 0")
        if self.keyframe_seconds <= 0:
            problems.append(f"keyframe_seconds={self.keyframe_seconds} must be above 0")
        if not 0 <= self.bframes <= 16:
            problems.append(f"bframes={self.bframes} must be 0 to 16 (x264's range)")
        if not 0 <= self.crf <= 51:
            problems.append(f"crf={self.crf} must be 0 to 51 (lower is better quality)")
        if self.preset not in X264_PRESETS:
            problems.append(f"preset={self.preset!r} is not an x264 preset ({', '.join(X264_PRESETS)})")
        if self.audio not in ("drop", "copy"):
            problems.append(f"audio={self.audio!r}: want drop or copy")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class CompressSummary:
    written: int = 0
    already_done: int = 0
    failed: list[str] = field(default_factory=list)  # "path: reason", one per unreadable video
    bytes_in: int = 0
    bytes_out: int = 0
    stopped_early: bool = False  # --on-bad-input fail met a bad video


def output_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """The encoded size: the shorter side scaled down to ``short_side`` (never up), aspect kept, both
    sides even (yuv420p)."""
    scale = 1.0
    if short_side is not None and min(width, height) > short_side:
        scale = short_side / min(width, height)
    even = lambda n: max(2, int(round(n * scale)) // 2 * 2)  # noqa: E731
    return even(width), even(height)


def compress_video(src: str | os.PathLike, dst: str | os.PathLike, options: CompressOptions) -> int:
    """Re-encode one video into ``dst`` (written as ``dst.partial``, then renamed); returns its size.

    Raises ``VideoReadError`` naming ``src`` when it cannot be read.
    """
    src, dst = Path(src), Path(dst)
    partial = dst.with_name(dst.name + PARTIAL_SUFFIX)
    try:
        with av.open(str(src)) as source:
            if not source.streams.video:
                raise VideoReadError(f"{src}: no video stream")
            video = source.streams.video[0]
            video.codec_context.thread_count = 1  # one process per video already fills the cores
            audio = source.streams.audio[0] if options.audio == "copy" and source.streams.audio else None
            rate = options.fps or video.average_rate or video.guessed_rate
            if not rate:
                raise VideoReadError(f"{src}: its frame rate is unknown; give --fps")
            dst.parent.mkdir(parents=True, exist_ok=True)
            with av.open(str(partial), mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
                written = _transcode(source, video, audio, out, Fraction(rate), options)
            if written == 0:
                raise VideoReadError(f"{src}: no frame could be decoded")
        os.replace(partial, dst)
        return dst.stat().st_size
    except av.FFmpegError as e:
        raise VideoReadError(f"{src}: {e}") from e
    finally:
        partial.unlink(missing_ok=True)


def _transcode(source, video, audio, out, rate: Fraction, options: CompressOptions) -> int:
    """Decode ``video`` and encode it into ``out`` at ``rate`` (and copy ``audio``); returns frames written."""
    width, height = output_size(video.codec_context.width, video.codec_context.height, options.short_side)
    stream = out.add_stream("libx264", rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.codec_context.thread_count = 1
    keyint = max(1, round(options.keyframe_seconds * rate))
    stream.codec_context.gop_size = keyint
    stream.options = {
        "crf": f"{options.crf:g}",
        "preset": options.preset,
        # Keyframes exactly every keyint frames (a scene cut between them is coded inside a P-frame),
        # and non-reference B-frames (no pyramid) in a fixed pattern: a reader skips those it does
        # not want, and each frame costs at most one keyframe and keyint / (bframes + 1) P-frames.
        "x264-params": f"keyint={keyint}:scenecut=0:bframes={options.bframes}:b-pyramid=none:b-adapt=0",
    }
    audio_out = out.add_stream_from_template(audio) if audio is not None else None
    tick = Fraction(1) / rate  # output frame k shows at k * tick
    end = Fraction(options.max_seconds).limit_denominator(10**6) if options.max_seconds else None
    in_duration = Fraction(1) / Fraction(video.average_rate or rate)
    start = video.start_time or 0
    count = 0
    previous = None  # (time, frame): the latest decoded frame, not yet encoded for every tick it covers

    def emit(frame, until: Fraction) -> bool:
        """Encode ``frame`` for every tick before ``until``; False once past ``--max-seconds``."""
        nonlocal count
        while count * tick < until:
            if end is not None and count * tick >= end:
                return False
            # threads=1: scaler threads would hang a process forked from this one (see video._rgb).
            picture = frame.reformat(
                width=width, height=height, format="yuv420p", interpolation="BICUBIC", threads=1
            )
            # A decoded frame keeps its source picture type, which libx264 would obey as a forced
            # frame type: the output would copy the source's keyframes instead of its own interval.
            picture.pict_type = PictureType.NONE
            picture.pts, picture.time_base = count, tick
            out.mux(stream.encode(picture))
            count += 1
        return True

    demuxed = [video] if audio is None else [video, audio]
    going = True
    for packet in source.demux(*demuxed):
        if packet.stream is audio:
            if packet.pts is not None and (
                end is None or (packet.pts - (audio.start_time or 0)) * audio.time_base < end
            ):
                packet.stream = audio_out
                out.mux(packet)
            continue
        if not going:
            if audio is None:
                break
            continue
        for frame in packet.decode():
            if frame.pts is None:
                continue
            at = (frame.pts - start) * Fraction(video.time_base)
            if previous is not None and not emit(previous[1], (previous[0] + at) / 2):
                going = False
                break
            previous = (at, frame)
    if going and previous is not None:  # the last frame lasts one input frame
        emit(previous[1], previous[0] + in_duration)
    out.mux(stream.encode(None))
    return count


def _compress_item(item: tuple[Path, Path, CompressOptions]) -> tuple[Path, int, str | None]:
    """``(src, bytes written, None)`` or ``(src, 0, "path: reason")``; never raises for a bad video."""
    src, dst, options = item
    try:
        return src, compress_video(src, dst, options), None
    except (VideoReadError, OSError, ValueError) as e:
        return src, 0, str(e) if str(src) in str(e) else f"{src}: {e}"


def plan_outputs(
    video_dir: Path, out_dir: Path, extensions: Sequence[str], mp4_names: bool = False
) -> dict[Path, Path]:
    """Each input video and the file it becomes: the same relative path (so annotation files that name
    videos still find them; readers go by the content, an mp4), or with ``mp4_names`` the suffix
    ``.mp4``, where two inputs that would share an output are an error."""
    if not video_dir.is_dir():
        raise FileNotFoundError(
            f"video folder {video_dir} does not exist; give the folder holding the videos"
        )
    if out_dir.resolve().is_relative_to(video_dir.resolve()):
        raise ValueError(
            f"the output folder {out_dir} is inside the video folder {video_dir}; choose one outside it"
        )
    files = find_videos(video_dir, extensions)
    if not files:
        raise FileNotFoundError(f"no videos ({', '.join(extensions)}) under {video_dir}")
    plan: dict[Path, Path] = {}
    sources: dict[Path, Path] = {}
    for src in files:
        dst = out_dir / src.relative_to(video_dir)
        if mp4_names:
            dst = dst.with_suffix(".mp4")
        if dst in sources:
            raise ValueError(f"{sources[dst]} and {src} would both be written to {dst}; rename one")
        sources[dst] = src
        plan[src] = dst
    return plan


def compress_folder(
    video_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: CompressOptions,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
    jobs: int = 1,
    on_bad_input: str = "skip",
    overwrite: bool = False,
    mp4_names: bool = False,
    progress: Callable[[str], None] | None = None,
) -> CompressSummary:
    """Re-encode every video under ``video_dir`` into ``out_dir``, ``jobs`` videos at a time.

    Videos whose output exists are left alone unless ``overwrite``. A bad video is recorded in the
    summary and skipped, or (``on_bad_input="fail"``) stops the run. A run stopped early (that, or
    Ctrl-C) stops the videos being encoded and removes their unfinished files.
    """
    if on_bad_input not in ("skip", "fail"):
        raise ValueError(f"on_bad_input={on_bad_input!r}; valid: skip, fail")
    video_dir, out_dir = Path(video_dir), Path(out_dir)
    plan = plan_outputs(video_dir, out_dir, extensions, mp4_names)
    summary = CompressSummary()
    todo = {}
    for src, dst in plan.items():
        if dst.exists() and not overwrite:
            summary.already_done += 1
        else:
            todo[src] = dst
    say = progress or (lambda message: None)
    started = last_report = time.perf_counter()

    def record(src: Path, size: int, error: str | None) -> None:
        nonlocal last_report
        if error is None:
            summary.written += 1
            summary.bytes_in += src.stat().st_size
            summary.bytes_out += size
        else:
            summary.failed.append(error)
            say(f"unreadable, {'stopping' if on_bad_input == 'fail' else 'skipped'}: {error}")
        done = summary.written + len(summary.failed)
        now = time.perf_counter()
        if now - last_report >= 2.0 or done == len(todo):
            rate = done / max(now - started, 1e-9)
            say(f"{done}/{len(todo)} videos ({rate:.1f}/s, about {(len(todo) - done) / rate:.0f}s left)")
            last_report = now

    work = [(src, dst, options) for src, dst in todo.items()]
    if jobs <= 1 or len(work) <= 1:
        results = map(_compress_item, work)
        pool = None
    else:
        # Workers ignore Ctrl-C: the parent stops them and removes what they left unfinished.
        pool = multiprocessing.Pool(
            min(jobs, len(work)), initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)
        )
        results = pool.imap_unordered(_compress_item, work)
    try:
        for src, size, error in results:
            record(src, size, error)
            if error is not None and on_bad_input == "fail":
                summary.stopped_early = True
                break
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
            for dst in todo.values():
                dst.with_name(dst.name + PARTIAL_SUFFIX).unlink(missing_ok=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainers.core.compress",
        description="Re-encode a folder of videos for sampled reading (a keyframe every half second, "
        "non-reference B-frames), optionally at a lower frame rate and size, as upstream's compress step.",
    )
    parser.add_argument("video_dir", help="folder holding the videos (searched recursively)")
    parser.add_argument("out_dir", help="folder to write the mp4s into (same relative paths)")
    parser.add_argument("--fps", type=Fraction, default=None, help="output frame rate (default: the input's)")
    parser.add_argument("--short-side", type=int, default=None, help="scale the shorter side down to this")
    parser.add_argument("--max-seconds", type=float, default=None, help="keep only the first seconds")
    default = CompressOptions()
    parser.add_argument(
        "--keyframe-seconds",
        type=float,
        default=default.keyframe_seconds,
        help="keyframe interval (default %(default)s)",
    )
    parser.add_argument(
        "--bframes",
        type=int,
        default=default.bframes,
        help="non-reference B-frames between references (default %(default)s)",
    )
    parser.add_argument(
        "--crf", type=float, default=default.crf, help="x264 quality, lower is better (default %(default)s)"
    )
    parser.add_argument("--preset", default=default.preset, help="x264 preset (default %(default)s)")
    parser.add_argument(
        "--audio", default=default.audio, choices=["drop", "copy"], help="default: drop, as upstream"
    )
    parser.add_argument("--ext", nargs="+", default=list(VIDEO_EXTENSIONS), help="video file extensions")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="videos at a time")
    parser.add_argument("--on-bad-input", default="skip", choices=["skip", "fail"])
    parser.add_argument("--overwrite", action="store_true", help="re-encode videos already written")
    parser.add_argument(
        "--mp4-names",
        action="store_true",
        help="name outputs <stem>.mp4 (default: the input's name, mp4 inside)",
    )
    args = parser.parse_args(argv)
    try:
        options = CompressOptions(**{f.name: getattr(args, f.name) for f in fields(CompressOptions)})
    except ValueError as e:
        parser.error(str(e))
    try:
        av.codec.Codec("libx264", "w")
    except ValueError:  # av's UnknownCodecError
        print(
            "error: this PyAV build has no libx264 encoder; install PyAV from PyPI (its wheels have it)",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    say = lambda message: print(message, flush=True)  # noqa: E731
    try:
        summary = compress_folder(
            args.video_dir,
            args.out_dir,
            options,
            args.ext,
            jobs=max(1, args.jobs),
            on_bad_input=args.on_bad_input,
            overwrite=args.overwrite,
            mp4_names=args.mp4_names,
            progress=say,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted: the videos in {args.out_dir} are complete (unfinished ones were removed); "
            "run the same command again to do the rest",
            file=sys.stderr,
        )
        return 130
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    say(
        f"compressed {summary.written} videos into {args.out_dir} in {time.perf_counter() - started:.1f}s "
        f"({mb(summary.bytes_in)} -> {mb(summary.bytes_out)}); {summary.already_done} already done, "
        f"{len(summary.failed)} unreadable"
    )
    for error in summary.failed:
        say(f"  unreadable: {error}")
    if summary.stopped_early:
        print(
            "error: stopped at an unreadable video (--on-bad-input fail); the videos written are complete",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
