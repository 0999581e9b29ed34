"""Audio for the crossformer: reading a file as mono 16 kHz and kaldi's log-mel filterbank in numpy.

The seed computes `torchaudio.compliance.kaldi.fbank(waveform - waveform.mean(), htk_compat=True,
sample_frequency=sr, use_energy=False, window_type='hanning', num_mel_bins=128, dither=0.0,
frame_shift=10)` (AudioMAE's / AST's call), pads or crops the frames to `target_length` and normalises
with AudioSet's statistics as (fbank - mean) / (2 * std). torchaudio is not a dependency here, so
`kaldi_fbank` re-implements that computation: 25 ms frames every 10 ms (snip_edges), per-frame DC
removal, pre-emphasis 0.97, a symmetric Hann ("hanning") window, a zero-padded power-of-two FFT, the
power spectrum through triangular filters evenly spaced on kaldi's mel scale (1127 ln(1 + f/700)) from
20 Hz to Nyquist, and the natural log floored at float32's epsilon.

Files: `.wav` through the stdlib `wave` module (8/16/32-bit PCM), anything else (the seed's `.mp3`) through
PyAV; both are mixed to mono and resampled (linear interpolation) to `SAMPLE_RATE`.
"""

from __future__ import annotations

import math
import os
import wave
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000  # AudioMAE / AST audio
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
_EPSILON = float(np.finfo(np.float32).eps)


class AudioReadError(RuntimeError):
    """An audio file that cannot be read (missing, corrupt, or no audio stream)."""


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples in [-1, 1] at `sample_rate`."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".wav":
            samples, rate = _read_wav(path)
        else:
            samples, rate = _read_av(path)
    except (OSError, EOFError, wave.Error, ValueError) as e:
        raise AudioReadError(f"cannot read audio {path}: {e}") from e
    if samples.size == 0:
        raise AudioReadError(f"audio {path} holds no samples")
    return resample(samples, rate, sample_rate)


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(os.fspath(path), "rb") as f:
        channels, width, rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
        raw = f.readframes(f.getnframes())
    if width == 1:  # 8-bit PCM is unsigned
        data = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 4):
        dtype = np.int16 if width == 2 else np.int32
        data = np.frombuffer(raw, dtype=dtype).astype(np.float32) / float(np.iinfo(dtype).max + 1)
    else:
        raise ValueError(f"{8 * width}-bit wav; expected 8-, 16- or 32-bit PCM")
    return data.reshape(-1, channels).mean(axis=1), rate


def _read_av(path: Path) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.audio:
                raise ValueError("no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            chunks = []
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except av.FFmpegError as e:
        raise ValueError(str(e)) from e
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), SAMPLE_RATE


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Linear-interpolation resampling (enough for a filterbank at 10 ms resolution)."""
    samples = np.asarray(samples, dtype=np.float32)
    if rate == target:
        return samples
    n = max(1, round(len(samples) * target / rate))
    positions = np.arange(n, dtype=np.float64) * (rate / target)
    return np.interp(positions, np.arange(len(samples)), samples).astype(np.float32)


def mel_banks(num_bins: int, num_fft_bins: int, sample_rate: int, low: float = LOW_FREQ) -> np.ndarray:
    """(num_bins, num_fft_bins) triangular filters on kaldi's mel scale, from `low` Hz to Nyquist."""
    nyquist = 0.5 * sample_rate
    if not 0 <= low < nyquist:
        raise ValueError(f"low frequency {low} Hz must be in [0, {nyquist})")

    def mel(f):
        return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)

    low_mel, high_mel = mel(low), mel(nyquist)
    delta = (high_mel - low_mel) / (num_bins + 1)
    left = low_mel + np.arange(num_bins)[:, None] * delta
    centre, right = left + delta, left + 2 * delta
    # FFT bin k (of a 2 * num_fft_bins point FFT) is at k * sample_rate / (2 * num_fft_bins) Hz
    fft_mel = mel(np.arange(num_fft_bins) * sample_rate / (2.0 * num_fft_bins))[None, :]
    up = (fft_mel - left) / (centre - left)
    down = (right - fft_mel) / (right - centre)
    return np.maximum(0.0, np.minimum(up, down))


def kaldi_fbank(
    samples: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    num_mel_bins: int = 128,
    frame_length_ms: float = FRAME_LENGTH_MS,
    frame_shift_ms: float = FRAME_SHIFT_MS,
) -> np.ndarray:
    """(num_frames, num_mel_bins) log-mel filterbank, as kaldi's `fbank` with the seed's options.

    `samples` in [-1, 1], as torchaudio loads them and the seed passes them on (kaldi's own tools
    read int16 values: their log energies are log(2^30) higher). The mean is removed first, as the seed
    does. Shorter than one window: zero frames.
    """
    x = np.asarray(samples, dtype=np.float64)
    x = x - x.mean() if x.size else x
    window = int(sample_rate * frame_length_ms / 1000.0)
    shift = int(sample_rate * frame_shift_ms / 1000.0)
    if x.size < window:
        return np.zeros((0, num_mel_bins), dtype=np.float32)
    count = 1 + (x.size - window) // shift
    frames = np.lib.stride_tricks.sliding_window_view(x, window)[::shift][:count].copy()
    frames -= frames.mean(axis=1, keepdims=True)  # remove_dc_offset
    frames[:, 1:] -= PREEMPHASIS * frames[:, :-1].copy()
    frames[:, 0] *= 1.0 - PREEMPHASIS
    hann = 0.5 - 0.5 * np.cos(2.0 * math.pi * np.arange(window) / (window - 1))
    frames *= hann
    fft_size = 1 << (window - 1).bit_length()
    power = np.abs(np.fft.rfft(frames, n=fft_size)) ** 2  # (count, fft_size / 2 + 1)
    banks = mel_banks(num_mel_bins, fft_size // 2, sample_rate)
    energies = power[:, : fft_size // 2] @ banks.T  # kaldi's banks leave out the Nyquist bin
    return np.log(np.maximum(energies, _EPSILON)).astype(np.float32)


def fbank_image(
    samples: np.ndarray,
    num_mel_bins: int,
    target_length: int,
    mean: float,
    std: float,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """The model's audio input (1, num_mel_bins, target_length): fbank frames zero-padded or cropped to
    `target_length` from the start, normalised (x - mean) / (2 * std), mel bins as rows."""
    fbank = kaldi_fbank(samples, sample_rate, num_mel_bins)
    if fbank.shape[0] < target_length:
        fbank = np.concatenate([fbank, np.zeros((target_length - fbank.shape[0], num_mel_bins), np.float32)])
    fbank = (fbank[:target_length] - mean) / (2.0 * std)
    return np.ascontiguousarray(fbank.T[None]).astype(np.float32)


__all__ = [
    "AudioReadError",
    "SAMPLE_RATE",
    "fbank_image",
    "kaldi_fbank",
    "mel_banks",
    "read_audio",
    "resample",
]
