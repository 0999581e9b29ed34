"""Frame sampling (upstream's get_frame_indices) and selective decoding."""

import io

import av
import numpy as np
import pytest

from trainers.core import video
from trainers.core.sample_data import write_video
from trainers.core.video import VideoReadError, frame_indices, read_clip_frames, read_frames, video_info


def _frames(n: int, size: int = 32) -> np.ndarray:
    """Frames that differ from each other everywhere (a moving gradient), so a wrong index shows."""
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((n, size, size, 3), np.uint8)
    for t in range(n):
        out[t, ..., 0] = (xx * 4 + 5 * t) % 256
        out[t, ..., 1] = (yy * 4 + 3 * t) % 256
        out[t, ..., 2] = (t * 11) % 256
    return out


def _decode_all(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.fixture(scope="module")
def short_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "short.mp4"
    write_video(path, _frames(40), fps=8)
    return path


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """300 frames with a keyframe every 10: long enough for the reader to seek."""
    path = tmp_path_factory.mktemp("video") / "long.mp4"
    write_video(path, _frames(300), fps=25, gop_size=10)
    return path


@pytest.fixture
def decode_counter(monkeypatch):
    """Counts the frames the reader pulls out of the decoder."""
    counts = {"frames": 0, "starts": 0}
    real = video._decode_frames

    def counting(container, stream):
        counts["starts"] += 1
        for frame in real(container, stream):
            counts["frames"] += 1
            yield frame

    monkeypatch.setattr(video, "_decode_frames", counting)
    return counts


# --- frame_indices ------------------------------------------------------------------------------------


def test_rand_picks_one_frame_inside_each_interval_and_varies_with_the_rng():
    draws = [frame_indices(4, 40, "rand", rng=np.random.default_rng(seed)) for seed in range(50)]
    for indices in draws:
        assert len(indices) == 4
        for i, index in enumerate(indices):
            assert 10 * i <= index < 10 * (i + 1)
    assert len({tuple(d) for d in draws}) > 10
    # the whole interval is reachable, including its last frame
    firsts = {frame_indices(1, 5, "rand", rng=np.random.default_rng(s))[0] for s in range(200)}
    assert firsts == {0, 1, 2, 3, 4}


def test_rand_is_reproducible_from_the_rng_and_from_numpy_global_state():
    assert frame_indices(4, 100, "rand", rng=np.random.default_rng(7)) == frame_indices(
        4, 100, "rand", rng=np.random.default_rng(7)
    )
    np.random.seed(3)
    first = frame_indices(4, 100, "rand")
    np.random.seed(3)
    assert frame_indices(4, 100, "rand") == first


def test_middle_is_the_centre_of_each_interval():
    assert frame_indices(4, 40, "middle") == [4, 14, 24, 34]
    assert frame_indices(1, 16, "middle") == [7]
    assert frame_indices(3, 10, "middle") == [1, 4, 7]  # intervals [0,3) [3,6) [6,10)


@pytest.mark.parametrize("sample", ["rand", "middle"])
def test_short_videos_use_every_frame_then_repeat_the_last(sample):
    assert frame_indices(6, 3, sample, rng=np.random.default_rng(0)) == [0, 1, 2, 2, 2, 2]
    assert frame_indices(4, 1, sample, rng=np.random.default_rng(0)) == [0, 0, 0, 0]


def test_fps_sampling_takes_window_centres_at_the_given_rate():
    # 10 s at 30 fps, one frame every 2 s: at 1, 3, 5, 7, 9 s
    assert frame_indices(0, 300, "fps0.5", input_fps=30) == [30, 90, 150, 210, 270]
    assert frame_indices(0, 300, "fps0.5", input_fps=30, max_num_frames=2) == [30, 90]
    assert frame_indices(0, 10, "fps1", input_fps=30) == [4]  # shorter than half a window: its middle


def test_bad_sample_arguments_say_what_is_expected():
    with pytest.raises(ValueError, match="rand, middle or fps"):
        frame_indices(4, 10, "uniform")
    with pytest.raises(ValueError, match="input_fps"):
        frame_indices(4, 10, "fps2")
    with pytest.raises(ValueError, match="0 frames"):
        frame_indices(4, 0, "middle")


# --- decoding -----------------------------------------------------------------------------------------


def test_read_frames_returns_exactly_the_sampled_frames(short_video):
    reference = _decode_all(short_video)
    frames, indices, vlen = read_frames(short_video, 4, "middle")
    assert vlen == len(reference) == 40
    assert indices == [4, 14, 24, 34]
    assert frames.dtype == np.uint8 and frames.shape == (4, 32, 32, 3)
    for frame, index in zip(frames, indices, strict=True):
        np.testing.assert_array_equal(frame, reference[index])


def test_read_frames_stops_decoding_at_the_last_wanted_frame(short_video, decode_counter):
    _, indices, _ = read_frames(short_video, 2, "middle")  # frames 9 and 29 of 40
    assert indices == [9, 29]
    assert decode_counter == {"frames": 30, "starts": 1}


def test_read_frames_pads_short_videos_with_the_last_frame(tmp_path):
    path = tmp_path / "three.mp4"
    write_video(path, _frames(3), fps=8)
    reference = _decode_all(path)
    frames, indices, vlen = read_frames(path, 5, "rand", rng=np.random.default_rng(0))
    assert (vlen, indices) == (3, [0, 1, 2, 2, 2])
    for frame, index in zip(frames, indices, strict=True):
        np.testing.assert_array_equal(frame, reference[index])


def test_long_videos_seek_to_keyframes_and_still_return_the_right_frames(long_video, decode_counter):
    reference = _decode_all(long_video)
    frames, indices, vlen = read_frames(long_video, 4, "middle")
    assert vlen == 300 and indices == [37, 112, 187, 262]
    for frame, index in zip(frames, indices, strict=True):
        np.testing.assert_array_equal(frame, reference[index])
    # each wanted frame is reached from the keyframe before it (at most 10 frames away), not from 0
    assert decode_counter["starts"] == 4
    assert decode_counter["frames"] <= 4 * 10


def test_seeking_and_decoding_straight_through_agree(long_video):
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    seeking = read_frames(long_video, 3, "rand", rng=rng_a, index_threshold=0)
    straight = read_frames(long_video, 3, "rand", rng=rng_b, index_threshold=10**9)
    assert seeking[1] == straight[1]
    np.testing.assert_array_equal(seeking[0], straight[0])


def test_read_clip_frames_takes_explicit_indices_in_the_given_order(long_video):
    reference = _decode_all(long_video)
    wanted = [250, 3, 3, 120, 299]
    frames = read_clip_frames(long_video, wanted)
    for frame, index in zip(frames, wanted, strict=True):
        np.testing.assert_array_equal(frame, reference[index])
    with pytest.raises(VideoReadError, match="has no frame 300"):
        read_clip_frames(long_video, [10, 300], index_threshold=10**9)


def test_missing_frame_count_metadata_falls_back_to_counting_packets(tmp_path):
    path = tmp_path / "no_count.mkv"  # Matroska stores no frame count
    write_video(path, _frames(21), fps=8)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    assert video_info(path) == (21, 8.0)
    reference = _decode_all(path)
    frames, indices, vlen = read_frames(path, 3, "middle")
    assert vlen == 21 and indices == [3, 10, 17]
    for frame, index in zip(frames, indices, strict=True):
        np.testing.assert_array_equal(frame, reference[index])


def test_unreadable_files_raise_an_error_naming_the_file(tmp_path):
    garbage = tmp_path / "broken.mp4"
    garbage.write_bytes(b"this is not a video" * 100)
    with pytest.raises(VideoReadError, match="broken.mp4"):
        read_frames(garbage, 1, "middle")
    with pytest.raises(VideoReadError, match="absent.mp4"):
        read_frames(tmp_path / "absent.mp4", 1, "middle")


def test_decoders_run_single_threaded(short_video):
    with video._open(short_video) as container:
        assert container.streams.video[0].codec_context.thread_count == 1


def test_mpeg4_fallback_videos_decode_the_same_way(tmp_path):
    path = tmp_path / "mpeg4.mp4"
    write_video(path, _frames(24), fps=8, codec="mpeg4")
    reference = _decode_all(path)
    frames, indices, vlen = read_frames(path, 4, "middle")
    assert vlen == 24
    for frame, index in zip(frames, indices, strict=True):
        np.testing.assert_array_equal(frame, reference[index])


class _InMemory(io.BytesIO):
    """A video's bytes that name themselves, as ClipBERT's LMDB store hands them over."""

    def __fspath__(self) -> str:
        return "memory:long.mp4"


def test_mp4_probe_decodes_nothing_and_every_read_returns_the_full_decodes_frames(long_video, tmp_path):
    # FFmpeg's stream probe would decode the first frame to learn the pixel format; for MP4 the reader
    # skips that (the decoder finds the format itself), other containers are probed as usual.
    with video._open(long_video) as container:
        assert container.streams.video[0].codec_context.pix_fmt is None
    mkv = tmp_path / "probed.mkv"
    write_video(mkv, _frames(12), fps=8)
    with video._open(mkv) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"
    reference = _decode_all(long_video)
    indices = [0, 5, 137, 140, 299, 12]
    for source in (lambda: long_video, lambda: _InMemory(long_video.read_bytes())):
        assert video_info(source()) == (300, 25.0)
        frames = read_clip_frames(source(), indices, index_threshold=10)
        for frame, index in zip(frames, indices, strict=True):
            np.testing.assert_array_equal(frame, reference[index])


def test_frames_are_converted_to_rgb_without_starting_threads(tmp_path, monkeypatch):
    """FFmpeg's scaler starts worker threads for a conversion unless told not to. A process forked
    while they exist (a DataLoader worker of a process that reads frames) has the scaler's state but
    not its threads, and hung forever in its first conversion (a make test run stopped on it)."""
    import os

    path = tmp_path / "noise.mp4"
    write_video(path, np.random.default_rng(0).integers(0, 256, (8, 240, 320, 3), dtype=np.uint8), fps=8)
    threads = lambda: len(os.listdir("/proc/self/task"))  # noqa: E731
    before = threads()
    during = []
    convert = video._rgb

    def watched(frame):
        rgb = convert(frame)
        during.append(threads())
        return rgb

    monkeypatch.setattr(video, "_rgb", watched)
    read_clip_frames(path, [0, 3, 5])
    assert len(during) == 3 and max(during) == before
