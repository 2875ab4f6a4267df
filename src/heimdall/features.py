"""Per-receiver IQ -> log-mel spectrogram, computed with torchaudio.

One implementation serves extract_features and ``heimdall predict``. Complex baseband has a
two-sided spectrum (the carrier sits at 0 Hz, the FM sidebands on both sides), so the mel
filterbank is mirrored: n_mels/2 bands from the carrier outwards on each side, fine near the
carrier where an NBFM voice signal puts its energy. Levels are calibrated: every band is the
power in that band in dBm (Parseval-normalised), so a 10 dB stronger signal reads 10 dB higher.
"""

from __future__ import annotations

import numpy as np
import torch
import torchaudio

# Floor added before the log: -200 dBm, far below any thermal noise floor.
POWER_FLOOR_MW = 1e-20
# Readings outside these ranges are not measurements (corrupt rows, sentinel values): dropped and
# counted. RSS in dBm; IQ calibration scale in sqrt(mW) per int16 count (1e3: full scale = +90 dBm).
RSS_RANGE_DBM = (-200.0, 60.0)
IQ_SCALE_MAX = 1e3


def hop_length_for(n_samples: int, n_fft: int, n_frames: int) -> int:
    """Hop so that exactly ``n_frames`` un-padded frames cover the recording."""
    if n_samples < n_fft:
        raise ValueError(f"IQ has {n_samples} samples, fewer than n_fft={n_fft}")
    if n_frames == 1:
        return n_fft
    hop = (n_samples - n_fft) // (n_frames - 1)
    if hop < 1:
        raise ValueError(f"{n_samples} samples cannot give {n_frames} frames of n_fft={n_fft}")
    return hop


def two_sided_mel_filterbank(n_fft: int, n_mels: int, sample_rate: float) -> torch.Tensor:
    """(n_fft, n_mels) weights for an FFT in natural order (0..fs/2, then -fs/2..0)."""
    half = torchaudio.functional.melscale_fbanks(
        n_freqs=n_fft // 2 + 1,
        f_min=0.0,
        f_max=sample_rate / 2,
        n_mels=n_mels // 2,
        sample_rate=int(sample_rate),
        norm=None,
        mel_scale="htk",
    )  # (n_fft/2 + 1, n_mels/2): bins at |f| = k fs / n_fft
    fb = torch.zeros(n_fft, n_mels)
    k = torch.arange(n_fft)
    abs_bin = torch.where(k <= n_fft // 2, k, n_fft - k)  # |f| of each natural-order bin
    positive = k <= n_fft // 2
    # columns ordered by frequency: negative side (outermost first), then positive side
    fb[positive, n_mels // 2 :] = half[abs_bin[positive]]
    fb[~positive, : n_mels // 2] = half[abs_bin[~positive]].flip(-1)
    return fb


class LogMelFrontend(torch.nn.Module):
    """complex IQ (..., S) in sqrt(mW) -> log-mel power (..., n_mels, n_frames) in dBm per band."""

    def __init__(self, sample_rate: float, n_samples: int, n_fft: int, n_mels: int, n_frames: int):
        super().__init__()
        self.n_frames = n_frames
        self.hop_length = hop_length_for(n_samples, n_fft, n_frames)
        self.spectrogram = torchaudio.transforms.Spectrogram(
            n_fft=n_fft,
            hop_length=self.hop_length,
            center=False,
            power=2.0,
            onesided=False,
            normalized=False,
        )
        window = torch.hann_window(n_fft)
        # Parseval: sum_k |X_k|^2 = n_fft * sum_n |x_n w_n|^2, so this makes bins sum to power.
        self.register_buffer("power_scale", 1.0 / (n_fft * window.pow(2).sum()), persistent=False)
        self.register_buffer("mel_fb", two_sided_mel_filterbank(n_fft, n_mels, sample_rate), persistent=False)

    def forward(self, iq: torch.Tensor) -> torch.Tensor:
        spec = self.spectrogram(iq)[..., : self.n_frames]  # (..., n_fft, F), natural bin order
        mel = torch.einsum("...kf,km->...mf", spec * self.power_scale, self.mel_fb)
        return 10.0 * torch.log10(mel + POWER_FLOOR_MW)


def iq_int16_to_complex(iq: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    """(..., S, 2) int16 counts and (...) scale -> complex64 tensor (..., S) in sqrt(mW)."""
    t = torch.from_numpy(np.ascontiguousarray(iq)).to(torch.float32)
    t = t * torch.from_numpy(np.asarray(scale, dtype=np.float32))[..., None, None]
    return torch.view_as_complex(t)


def featurize_block(present, rss_dbm, snr_db, has_iq, iq_scale, iq, frontend: LogMelFrontend) -> tuple[dict, int]:
    """One block of sessions.h5 ``measurements`` rows -> the model's per-receiver features.

    The single implementation of "measurement -> feature" shared by extract_features and
    ``heimdall predict``. A present receiver needs a finite RSS (else it is dropped); its IQ
    is used only with a finite, positive calibration scale (else RSS/SNR only). Returns the
    features (logmel_db, rss_dbm, snr_db, present, has_iq) and how many readings were dropped.
    """
    present = np.asarray(present, dtype=bool)
    has_iq = np.asarray(has_iq, dtype=bool) & present
    with np.errstate(invalid="ignore"):
        bad = present & ~((rss_dbm >= RSS_RANGE_DBM[0]) & (rss_dbm <= RSS_RANGE_DBM[1]))  # NaN fails too
        bad_iq = has_iq & ~((iq_scale > 0) & (iq_scale <= IQ_SCALE_MAX))
        snr_ok = np.isfinite(snr_db) & (np.abs(snr_db) <= 200.0)
    present = present & ~bad
    has_iq = has_iq & present & ~bad_iq
    snr = np.where(present & snr_ok, snr_db, 0.0).astype(np.float32)
    rss = np.where(present, rss_dbm, 0.0).astype(np.float32)
    with torch.no_grad():
        mel = frontend(iq_int16_to_complex(iq, np.where(has_iq, iq_scale, 0.0))).numpy()
    broken = has_iq & ~np.isfinite(mel).all(axis=(-2, -1))  # belt and braces: never a non-finite feature
    has_iq &= ~broken
    bad_iq |= broken
    skipped = int(bad.sum()) + int((bad_iq & ~bad).sum())
    mel[~has_iq] = 0.0
    return {"logmel_db": mel, "rss_dbm": rss, "snr_db": snr, "present": present, "has_iq": has_iq}, skipped
