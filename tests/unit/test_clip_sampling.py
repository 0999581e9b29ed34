"""ClipBERT, ALPRO and crossformer frame samplers, and decoding just the sampled frames."""

import functools

import av
import numpy as np
import pytest

from trainers.core import clip_sampling as cs
from trainers.core.sample_data import write_video


def _frames(n: int, size: int = 32) -> np.ndarray:
    """Frames that differ from each other everywhere, so a wrong index shows."""
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


def _rngs(n=50):
    return [np.random.default_rng(seed) for seed in range(n)]


def _inside(indices, vlen):
    return all(0 <= i < vlen for i in indices)


# --- ClipBERT ---------------------------------------------------------------------------------------

clipbert = functools.partial(cs.clipbert_indices, num_clips=4, frames_per_clip=2, target_fps=2)


def test_clipbert_clips_are_short_runs_at_the_target_rate_anywhere_in_the_video():
    # 30 fps, 2 frames at 2 fps: a clip spans 30 source frames, its frames are 29 apart (upstream's
    # linspace over the span), 28 when the clip starts between two frames
    draws = [clipbert(900, 30.0, rng) for rng in _rngs()]
    for indices in draws:
        assert len(indices) == 8 and _inside(indices, 900)
        clips = [indices[i : i + 2] for i in range(0, 8, 2)]
        assert all(b - a in (28, 29) for a, b in clips)
        assert [c[0] for c in clips] == sorted(c[0] for c in clips)
    starts = np.array([d[0::2] for d in draws]).ravel()
    assert len(set(starts.tolist())) > 100  # starts vary with the rng ...
    assert starts.min() < 100 and starts.max() > 770  # ... over the whole video (last start <= 870)
    assert clipbert(900, 30.0, np.random.default_rng(3)) == clipbert(900, 30.0, np.random.default_rng(3))


def test_clipbert_test_clips_are_evenly_spaced_and_fixed():
    # upstream: clip i starts at (vlen - clip_size) * i / num_clips = 0, 217.5, 435, 652.5 and keeps
    # the frames whose timestamps fall in [start, start + 29]
    indices = clipbert(900, 30.0, np.random.default_rng(0), training=False)
    assert indices == [0, 29, 218, 246, 435, 464, 653, 681]
    assert clipbert(900, 30.0, np.random.default_rng(1), training=False) == indices


def test_clipbert_short_videos_repeat_their_last_frame():
    assert clipbert(10, 30.0, np.random.default_rng(0)) == [0, 9] * 4
    assert clipbert(1, 30.0, np.random.default_rng(0), training=False) == [0] * 8


def test_clipbert_needs_the_frame_rate():
    with pytest.raises(ValueError, match="frame rate"):
        clipbert(900, None, np.random.default_rng(0))


# --- ALPRO ------------------------------------------------------------------------------------------


def test_alpro_uniform_is_evenly_spaced_from_the_first_frame():
    assert cs.alpro_indices(900, num_frames=8, sample="uniform") == [0, 112, 225, 337, 450, 562, 675, 787]
    # not upstream's arange(dtype=int) quirk, which would give 0, 3, ..., 21 here
    assert cs.alpro_indices(30, num_frames=8, sample="uniform") == [0, 3, 7, 11, 15, 18, 22, 26]
    assert cs.alpro_indices(3, num_frames=6, sample="uniform") == [0, 0, 1, 1, 2, 2]


def test_alpro_rand_draws_distinct_sorted_frames_anywhere():
    draws = [cs.alpro_indices(100, None, rng, num_frames=8, sample="rand") for rng in _rngs()]
    for indices in draws:
        assert len(indices) == 8 and indices == sorted(set(indices)) and _inside(indices, 100)
    assert len({tuple(d) for d in draws}) == len(draws)
    assert cs.alpro_indices(5, None, np.random.default_rng(0), num_frames=8, sample="rand") == [
        0, 1, 2, 3, 4, 4, 4, 4,
    ]  # fmt: skip


def test_alpro_nlvl_rand_takes_one_frame_per_interval():
    for rng in _rngs():
        indices = cs.alpro_indices(100, None, rng, num_frames=4, sample="nlvl_rand")
        assert [i // 25 for i in indices] == [0, 1, 2, 3]


def test_alpro_headtail_takes_half_from_each_half():
    draws = [cs.alpro_indices(100, None, rng, num_frames=8, sample="headtail") for rng in _rngs()]
    for indices in draws:
        assert len(indices) == 8 and indices == sorted(set(indices))
        assert all(i < 50 for i in indices[:4]) and all(50 <= i < 100 for i in indices[4:])
    assert len({tuple(d) for d in draws}) > 40
    assert len(cs.alpro_indices(100, None, np.random.default_rng(0), num_frames=5, sample="headtail")) == 5
    # a one-frame video still gives the frames asked for
    assert cs.alpro_indices(1, None, np.random.default_rng(0), num_frames=4, sample="headtail") == [0] * 4


@pytest.mark.parametrize("sample", cs.ALPRO_SAMPLES)
def test_alpro_is_deterministic_at_test_time(sample):
    a = cs.alpro_indices(300, None, np.random.default_rng(0), num_frames=8, sample=sample, training=False)
    b = cs.alpro_indices(300, None, np.random.default_rng(1), num_frames=8, sample=sample, training=False)
    assert a == b and len(a) == 8 and a == sorted(a) and _inside(a, 300)
    if sample == "headtail":
        assert a == [0, 37, 75, 112, 150, 187, 225, 262]  # uniform inside each half


def test_alpro_names_its_samples():
    with pytest.raises(ValueError, match="uniform, rand, nlvl_rand, headtail"):
        cs.alpro_indices(100, num_frames=4, sample="middle")


# --- crossformer ------------------------------------------------------------------------------------


def test_crossformer_takes_a_random_64_frame_window_with_stride_about_4():
    draws = [cs.crossformer_indices(300, 30.0, rng) for rng in _rngs(100)]
    for indices in draws:
        assert len(indices) == 16 and _inside(indices, 300)
        gaps = np.diff(indices)
        assert set(gaps.tolist()) <= {4, 5}  # upstream's linspace over 64 frames: 64 / 15 apart
        assert indices[-1] - indices[0] <= 63
    starts = [d[0] for d in draws]
    assert len(set(starts)) > 50 and min(starts) < 30 and max(starts) > 200


def test_crossformer_matches_upstream_sample_frame_indices():
    def upstream(clip_len, frame_sample_rate, seg_len, rng):  # transformers' VideoMAE example
        converted_len = int(clip_len * frame_sample_rate)
        end_idx = rng.integers(converted_len, seg_len)
        start_idx = end_idx - converted_len
        indices = np.linspace(start_idx, end_idx, num=clip_len)
        return np.clip(indices, start_idx, end_idx - 1).astype(np.int64).tolist()

    for seed in range(20):
        ours = cs.crossformer_indices(250, None, np.random.default_rng(seed))
        assert ours == upstream(16, 4, 250, np.random.default_rng(seed))


def test_crossformer_centres_the_window_at_test_and_keeps_the_stride_on_short_videos():
    indices = cs.crossformer_indices(300, None, np.random.default_rng(0), training=False)
    assert indices == cs.crossformer_indices(300, None, np.random.default_rng(9), training=False)
    assert indices[0] == 118 and indices[-1] == 181  # window 118..182 in the middle of 300 frames
    assert cs.crossformer_indices(20, None, np.random.default_rng(0)) == [0, 4, 8, 12, 16] + [19] * 11
    assert cs.crossformer_indices(64, None, np.random.default_rng(0), training=False)[-1] == 60


def test_samplers_use_numpy_global_state_without_an_rng():
    for sampler in (
        functools.partial(cs.crossformer_indices, 300),
        functools.partial(cs.alpro_indices, 300, num_frames=8, sample="rand"),
        functools.partial(clipbert, 900, 30.0),
    ):
        np.random.seed(4)
        first = sampler()
        np.random.seed(4)
        assert sampler() == first


# --- decoding -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """300 frames at 30 fps with a keyframe every 30 (the reader seeks and skips B-frames)."""
    path = tmp_path_factory.mktemp("clips") / "long.mp4"
    write_video(path, _frames(300), fps=30, gop_size=30)
    return path


@pytest.mark.parametrize(
    "sampler",
    [
        functools.partial(cs.clipbert_indices, num_clips=3, frames_per_clip=2, target_fps=2),
        functools.partial(cs.alpro_indices, num_frames=8, sample="uniform"),
        functools.partial(cs.alpro_indices, num_frames=8, sample="headtail"),
        functools.partial(cs.alpro_indices, num_frames=8, sample="rand"),
        functools.partial(cs.crossformer_indices, clip_len=16, frame_sample_rate=4),
        functools.partial(cs.singularity_indices, num_frames=4, sample="middle"),
    ],
    ids=["clipbert", "alpro_uniform", "alpro_headtail", "alpro_rand", "crossformer", "singularity"],
)
def test_read_sampled_returns_the_frames_a_full_decode_has_at_those_indices(long_video, sampler):
    reference = _decode_all(long_video)
    for seed in range(3):
        frames, indices, vlen = cs.read_sampled(long_video, sampler, np.random.default_rng(seed))
        assert vlen == 300
        assert indices == sampler(300, 30.0, np.random.default_rng(seed))
        assert frames.shape == (len(indices), 32, 32, 3) and frames.dtype == np.uint8
        for frame, index in zip(frames, indices, strict=True):
            np.testing.assert_array_equal(frame, reference[index])


def test_read_sampled_on_a_video_shorter_than_the_request(tmp_path):
    path = tmp_path / "short.mp4"
    write_video(path, _frames(12), fps=30)
    reference = _decode_all(path)
    sampler = functools.partial(cs.crossformer_indices, clip_len=16, frame_sample_rate=4)
    frames, indices, vlen = cs.read_sampled(path, sampler, np.random.default_rng(0))
    assert vlen == 12 and indices == [0, 4, 8] + [11] * 13
    for frame, index in zip(frames, indices, strict=True):
        np.testing.assert_array_equal(frame, reference[index])
