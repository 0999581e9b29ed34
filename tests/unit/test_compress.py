"""The compress command: re-encoding a video folder for sampled reading (trainers/core/compress.py)."""

import os
import signal
import subprocess
import sys
import time
from fractions import Fraction

import av
import numpy as np
import pytest

from trainers.core import compress
from trainers.core.compress import CompressOptions, compress_folder, compress_video, output_size
from trainers.core.sample_data import write_video
from trainers.core.video import read_clip_frames

STRIPES = 8  # frame t carries t in binary, one bit per 8-pixel-wide stripe along the top


def _frames(n: int, width: int = 64, height: int = 48) -> np.ndarray:
    """A slowly moving gradient (so x264 sees an ordinary scene, no cuts) with the frame's number in
    black/white stripes along the top, which survive lossy encoding."""
    yy, xx = np.mgrid[0:height, 0:width]
    out = np.empty((n, height, width, 3), np.uint8)
    for t in range(n):
        out[t, ..., 0] = (xx * 2 + t) % 256
        out[t, ..., 1] = (yy * 3 + 2 * t) % 256
        out[t, ..., 2] = 128
        for bit in range(STRIPES):
            out[t, :8, bit * 8 : bit * 8 + 8] = 235 if (t >> bit) & 1 else 16
    return out


def _numbers(frames) -> list[int]:
    """The frame numbers written by _frames, read back from decoded frames."""
    bits = [f[2:6, :, :].mean(axis=(0, 2)).reshape(STRIPES, 8)[:, 2:6].mean(axis=1) > 128 for f in frames]
    return [int(sum(1 << i for i, on in enumerate(b) if on)) for b in bits]


def _decode(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def _keyframes_and_references(path) -> tuple[list[int], int, int]:
    """Keyframe positions (presentation order), frames decoded when non-reference ones are skipped,
    and the frame count."""
    with av.open(str(path)) as container:
        packets = sorted((p for p in container.demux(video=0) if p.size), key=lambda p: p.pts)
        keyframes = [i for i, p in enumerate(packets) if p.is_keyframe]
    with av.open(str(path)) as container:
        container.streams.video[0].codec_context.skip_frame = "NONREF"
        references = sum(1 for _ in container.decode(video=0))
    return keyframes, references, len(packets)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """3 s at 30 fps with x264's default keyframe interval: one keyframe."""
    path = tmp_path_factory.mktemp("src") / "clip.mp4"
    write_video(path, _frames(90), fps=30)
    return path


def test_default_output_has_every_frame_a_keyframe_every_half_second_and_skippable_b_frames(source, tmp_path):
    assert _numbers(_decode(source)) == list(range(90))
    assert _keyframes_and_references(source)[0] == [0]
    out = tmp_path / "clip.mp4"
    compress_video(source, out, CompressOptions())

    decoded = _decode(out)
    assert _numbers(decoded) == list(range(90))
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.average_rate) == ("h264", 30)
        assert (stream.width, stream.height) == (64, 48)
    keyframes, references, count = _keyframes_and_references(out)
    assert keyframes == list(range(0, 90, 15))
    # Between keyframes only every 8th frame is a reference: the reader skips the other 7 it does not want.
    assert references <= len(keyframes) + count // 8 + 1
    # The reader's selective decoding gives the pixels of a full decode on these files too.
    spread = [3, 29, 31, 52, 60, 88]
    np.testing.assert_array_equal(read_clip_frames(out, spread), np.stack([decoded[i] for i in spread]))


def test_a_source_keyframe_does_not_become_an_output_keyframe(tmp_path):
    """Decoded frames carry their source picture type; libx264 would obey it as a forced type."""
    src = tmp_path / "src.mp4"
    write_video(src, _frames(60), fps=30, gop_size=7)
    out = tmp_path / "out.mp4"
    compress_video(src, out, CompressOptions(keyframe_seconds=1))
    assert _keyframes_and_references(out)[0] == [0, 30]


@pytest.mark.parametrize(
    ("fps", "expected"), [(2, [0, 15, 30, 45, 60, 75]), (12, [(5 * k + 1) // 2 for k in range(36)])]
)
def test_lower_frame_rate_takes_the_frame_nearest_each_output_time(source, tmp_path, fps, expected):
    out = tmp_path / "clip.mp4"
    compress_video(source, out, CompressOptions(fps=Fraction(fps)))
    assert _numbers(_decode(out)) == expected
    with av.open(str(out)) as container:
        assert container.streams.video[0].average_rate == fps


def test_max_seconds_keeps_the_start(source, tmp_path):
    out = tmp_path / "clip.mp4"
    compress_video(source, out, CompressOptions(max_seconds=1))
    assert _numbers(_decode(out)) == list(range(30))


@pytest.mark.parametrize(
    ("size", "short_side", "expected"),
    [((640, 480), 224, (298, 224)), ((480, 640), 224, (224, 298)), ((320, 240), 360, (320, 240)),
     ((65, 49), None, (64, 48)), ((64, 48), 25, (32, 24))],
)  # fmt: skip
def test_output_size_scales_the_short_side_down_only_and_keeps_sides_even(size, short_side, expected):
    assert output_size(*size, short_side) == expected


def test_short_side_scales_the_video(source, tmp_path):
    out = tmp_path / "clip.mp4"
    compress_video(source, out, CompressOptions(short_side=24))
    frames = _decode(out)
    assert frames[0].shape == (24, 32, 3)
    assert len(frames) == 90


def _with_audio(path, seconds: int = 3) -> None:
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=30)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("aac", rate=16000, layout="mono")
        for frame in _frames(30 * seconds):
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode(None))
        tone = np.sin(np.arange(16000 * seconds) / 5).astype(np.float32)[None]
        for start in range(0, tone.shape[1], 1024):
            chunk = av.AudioFrame.from_ndarray(tone[:, start : start + 1024], format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 16000, start
            container.mux(audio.encode(chunk))
        container.mux(audio.encode(None))


def _audio_seconds(path) -> float | None:
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        packets = [p for p in container.demux(stream) if p.size]
        return float((packets[-1].pts + packets[-1].duration) * stream.time_base)


def test_audio_is_dropped_by_default_and_copied_on_request(tmp_path):
    src = tmp_path / "talk.mp4"
    _with_audio(src)
    assert _audio_seconds(src) == pytest.approx(3, abs=0.1)
    compress_video(src, tmp_path / "dropped.mp4", CompressOptions())
    assert _audio_seconds(tmp_path / "dropped.mp4") is None
    compress_video(src, tmp_path / "copied.mp4", CompressOptions(audio="copy"))
    assert _audio_seconds(tmp_path / "copied.mp4") == pytest.approx(3, abs=0.1)
    compress_video(src, tmp_path / "cut.mp4", CompressOptions(audio="copy", max_seconds=1))
    assert _audio_seconds(tmp_path / "cut.mp4") == pytest.approx(1, abs=0.1)
    assert len(_decode(tmp_path / "cut.mp4")) == 30


@pytest.fixture
def folder(tmp_path):
    """Two good videos (one nested, one Matroska), a file that is not a video, and a broken one."""
    root = tmp_path / "videos"
    (root / "sub").mkdir(parents=True)
    write_video(root / "a.mp4", _frames(40), fps=20)
    with av.open(str(root / "sub" / "b.mkv"), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in _frames(20):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    (root / "notes.txt").write_text("not a video")
    (root / "broken").mkdir()
    (root / "broken" / "c.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8)
    return root


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainers.core.compress", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_folder_keeps_relative_paths_skips_a_broken_video_and_resumes(folder, tmp_path):
    out = tmp_path / "prepared"
    proc = _cli(folder, out, "--jobs", 2)
    assert proc.returncode == 0, proc.stderr
    assert f"unreadable: {folder / 'broken' / 'c.mp4'}" in proc.stdout
    assert "compressed 2 videos" in proc.stdout and "1 unreadable" in proc.stdout
    # Same names, so the annotation files still find them; the Matroska input is an mp4 now. The
    # broken video's folder is not made.
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert written == ["a.mp4", "sub", "sub/b.mkv"]
    assert _numbers(_decode(out / "a.mp4")) == list(range(40))
    with av.open(str(out / "sub" / "b.mkv")) as container:
        assert "mp4" in container.format.name
    assert _numbers(read_clip_frames(out / "sub" / "b.mkv", range(20))) == list(range(20))

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.mp4")}
    again = _cli(folder, out, "--jobs", 1)
    assert again.returncode == 0, again.stderr
    assert "compressed 0 videos" in again.stdout and "2 already done" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.mp4")} == stamps

    summary = compress_folder(folder, out, CompressOptions(), overwrite=True)
    assert (summary.written, summary.already_done, len(summary.failed)) == (2, 0, 1)

    renamed = tmp_path / "renamed"
    assert compress_folder(folder, renamed, CompressOptions(), mp4_names=True).written == 2
    assert sorted(p.relative_to(renamed).as_posix() for p in renamed.rglob("*") if p.is_file()) == [
        "a.mp4",
        "sub/b.mp4",
    ]


def test_on_bad_input_fail_stops_with_exit_1_and_leaves_only_complete_videos(folder, tmp_path):
    out = tmp_path / "prepared"
    proc = _cli(folder, out, "--on-bad-input", "fail", "--jobs", 1)
    assert proc.returncode == 1
    assert "broken/c.mp4" in proc.stdout and "--on-bad-input fail" in proc.stderr
    # broken/c.mp4 sorts before sub/b.mkv: the run stopped there; what it wrote before is whole.
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["a.mp4"]
    assert _numbers(_decode(out / "a.mp4")) == list(range(40))


def test_an_interrupted_video_leaves_no_file_and_a_stale_partial_is_replaced(source, tmp_path, monkeypatch):
    out = tmp_path / "clip.mp4"
    real = compress._transcode

    def interrupted(source_container, video, audio, out_container, rate, options):
        real(source_container, video, audio, out_container, rate, CompressOptions(max_seconds=0.5))
        raise KeyboardInterrupt

    monkeypatch.setattr(compress, "_transcode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compress_video(source, out, CompressOptions())
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    (tmp_path / "clip.mp4.partial").write_bytes(b"left by a killed run")
    compress_video(source, out, CompressOptions())
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]
    assert len(_decode(out)) == 90


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fps", "0"], "fps=0 must be above 0"),
        (["--preset", "fastest"], "preset='fastest' is not an x264 preset (ultrafast, superfast"),
        (["--bframes", "20"], "bframes=20 must be 0 to 16"),
    ],
)
def test_bad_options_fail_in_one_line_before_anything_is_written(folder, tmp_path, args, message):
    proc = _cli(folder, tmp_path / "out", *args)
    assert proc.returncode == 2
    assert message in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_bad_folders_fail_in_one_line(folder, tmp_path):
    (folder / "a.mkv").write_bytes(b"")
    proc = _cli(folder, tmp_path / "out", "--mp4-names")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {folder / 'a.mkv'} and {folder / 'a.mp4'} would both be written to {tmp_path / 'out' / 'a.mp4'}; rename one"
    )
    assert not (tmp_path / "out").exists()
    (folder / "a.mkv").unlink()

    proc = _cli(folder, folder / "prepared")
    assert proc.returncode == 2 and "is inside the video folder" in proc.stderr
    proc = _cli(tmp_path / "nowhere", tmp_path / "out")
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_ctrl_c_stops_the_workers_at_once_and_leaves_only_complete_videos(tmp_path):
    rng = np.random.default_rng(0)
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(4):  # noise encodes slowly: each takes a while at x264's medium preset
        write_video(videos / f"v{i}.mp4", rng.integers(0, 256, (240, 120, 160, 3), dtype=np.uint8), fps=30)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainers.core.compress", str(videos), str(out), "--jobs", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a terminal's Ctrl-C reaches the whole process group
    )
    deadline = time.monotonic() + 60  # the wait for the first video to start, not a measurement
    while not list(out.rglob("*.partial")) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # as the first videos start: none is complete yet
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "run the same command again to do the rest" in stderr
    # The videos being encoded were stopped and removed, and the queued ones never started.
    assert list(out.rglob("*")) == []
    again = _cli(videos, out, "--jobs", "2")
    assert again.returncode == 0 and "compressed 4 videos" in again.stdout
    assert [len(_decode(p)) for p in sorted(out.iterdir())] == [240] * 4
