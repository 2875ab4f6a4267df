"""extract_features: calibrated, finite log-mel levels; clear errors on bad sessions files."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch

from heimdall.cli import main
from heimdall.contracts import SPLIT_CODES
from heimdall.features import LogMelFrontend, two_sided_mel_filterbank
from heimdall.params import load_params
from heimdall.stages import extract_features


def test_features_finite_and_masked(tiny_campaign):
    _, _, features = tiny_campaign
    with h5py.File(features) as f:
        logmel = f["features/logmel_db"][()]
        has_iq, present = f["features/has_iq"][()], f["features/present"][()]
        rss = f["features/rss_dbm"][()]
        for k in f["normalization"]:
            assert np.isfinite(f[f"normalization/{k}"][()]).all(), k
    assert np.isfinite(logmel).all() and np.isfinite(rss).all()
    assert (logmel[~has_iq] == 0).all() and (rss[~present] == 0).all()
    # real receivers sit far above the -200 dBm floor
    assert logmel[has_iq].min() > -190


def test_stronger_signal_gives_higher_logmel_level():
    fe = LogMelFrontend(12000, 3000, 256, 64, 32)
    rng = np.random.default_rng(0)
    x = torch.from_numpy((rng.standard_normal((4, 3000)) + 1j * rng.standard_normal((4, 3000))).astype(np.complex64))
    base = fe(x * 1e-6)
    louder = fe(x * 1e-6 * np.sqrt(10.0))  # +10 dB
    assert torch.allclose(louder - base, torch.full_like(base, 10.0), atol=1e-3)


def test_logmel_bands_sum_to_signal_power():
    # Parseval-normalised: a tone's power shows up, in dBm, in the bands around its frequency.
    fs, s = 12000, 3000
    t = np.arange(s) / fs
    amp = 1e-5  # sqrt(mW) -> -100 dBm
    tone = torch.from_numpy((amp * np.exp(2j * np.pi * 1000 * t)).astype(np.complex64))
    mel = LogMelFrontend(fs, s, 256, 64, 32)(tone)  # (M, F)
    total_dbm = 10 * np.log10((10 ** (mel.numpy() / 10)).sum(axis=0))
    assert np.allclose(total_dbm, -100.0, atol=1.5)
    # a positive-frequency tone lands in the upper half of the (frequency-ordered) bands
    assert mel[32:].mean() > mel[:32].mean() + 20


def test_logmel_level_orders_like_rss(tiny_campaign):
    _, _, features = tiny_campaign
    with h5py.File(features) as f:
        logmel = f["features/logmel_db"][()]
        has_iq = f["features/has_iq"][()]
        rss = f["features/rss_dbm"][()]
    level = 10 * np.log10((10 ** (logmel / 10)).sum(axis=2).mean(axis=-1))  # band power summed
    a, b = level[has_iq], rss[has_iq]
    ranks = lambda v: np.argsort(np.argsort(v))
    assert np.corrcoef(ranks(a), ranks(b))[0, 1] > 0.99
    assert np.median(np.abs(a - b)) < 1.0  # same calibrated level, within window effects


def test_filterbank_is_symmetric_and_covers_every_band():
    fb = two_sided_mel_filterbank(256, 64, 12000)
    assert (fb.max(dim=0).values > 0).all()
    # band m on the positive side mirrors band (M-1-m) on the negative side
    k = torch.arange(1, 128)
    assert torch.allclose(fb[k, 32:], fb[256 - k, :32].flip(-1))


def test_normalization_uses_training_split_only(tiny_campaign):
    _, _, features = tiny_campaign
    with h5py.File(features) as f:
        split = f["sessions/split"][()]
        rss, present = f["features/rss_dbm"][()], f["features/present"][()]
        mean, std = f["normalization/rss_mean_dbm"][()], f["normalization/rss_std_db"][()]
        tgt, tmean = f["sessions/target_enu_m"][()], f["normalization/target_mean_m"][()]
    train = split == SPLIT_CODES["train"]
    sel = present & train[:, None]
    assert mean == pytest.approx(rss[sel].mean(), abs=1e-3)
    assert std == pytest.approx(rss[sel].std(), rel=1e-4)
    assert np.allclose(tmean, tgt[train].mean(axis=0))
    assert mean != pytest.approx(rss[present].mean(), abs=1e-3)  # would differ if all rows were used


def test_features_deterministic(tiny_campaign, tmp_path):
    params, sessions, features = tiny_campaign
    again = tmp_path / "features.h5"
    extract_features.run(params, sessions, again, progress=False)
    assert again.read_bytes() == features.read_bytes()


def test_truncated_sessions_file_is_a_one_line_error(tiny_campaign, tmp_path, capsys, make_params):
    _, sessions, _ = tiny_campaign
    bad = tmp_path / "sessions.h5"
    data = sessions.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    out = tmp_path / "features.h5"
    code = main(["extract-features", "--params", str(make_params()), "--sessions", str(bad), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and str(bad) in err
    assert not out.exists()


def test_garbage_and_missing_sessions_file(tmp_path, capsys, make_params):
    out = tmp_path / "features.h5"
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\x00not hdf5" * 100)
    for path in (garbage, tmp_path / "missing.h5"):
        code = main(["extract-features", "--params", str(make_params()), "--sessions", str(path), "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 1 and len(err.splitlines()) == 1 and str(path) in err
        assert not out.exists()


def test_sessions_file_missing_a_dataset(tiny_campaign, tmp_path, capsys, make_params):
    _, sessions, _ = tiny_campaign
    bad = tmp_path / "sessions.h5"
    shutil.copy(sessions, bad)
    with h5py.File(bad, "a") as f:
        del f["measurements/rss_dbm"]
    out = tmp_path / "features.h5"
    code = main(["extract-features", "--params", str(make_params()), "--sessions", str(bad), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "measurements/rss_dbm" in err and not out.exists()


def test_bad_frame_geometry_is_reported(tiny_campaign, tmp_path, capsys, make_params):
    _, sessions, _ = tiny_campaign
    out = tmp_path / "features.h5"
    params = make_params(**{"extract_features.n_fft": 4096})  # longer than the 3000-sample IQ
    code = main(["extract-features", "--params", str(params), "--sessions", str(sessions), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "n_fft" in err and not out.exists()


def test_split_fractions(tiny_campaign):
    params, _, features = tiny_campaign
    with h5py.File(features) as f:
        split = f["sessions/split"][()]
    n = len(split)
    assert (split == SPLIT_CODES["test"]).sum() == round(params.extract_features.split.test_fraction * n)
    assert (split == SPLIT_CODES["val"]).sum() == round(params.extract_features.split.val_fraction * n)


def test_rss_only_sessions_without_iq(tiny_campaign, tmp_path, make_params):
    # A future source may deliver RSS but no IQ: features still export, spectrogram masked.
    _, sessions, _ = tiny_campaign
    rss_only = tmp_path / "sessions.h5"
    shutil.copy(sessions, rss_only)
    with h5py.File(rss_only, "a") as f:
        f["measurements/has_iq"][...] = False
        f["measurements/iq"][...] = np.zeros(f["measurements/iq"].shape, np.int16)  # (scalar broadcast is very slow in h5py)
    out = tmp_path / "features.h5"
    extract_features.run(load_params(make_params()), rss_only, out, progress=False)
    with h5py.File(out) as f:
        assert not f["features/has_iq"][()].any()
        assert (f["features/logmel_db"][()] == 0).all()
        assert f["features/present"][()].mean() > 0.8
