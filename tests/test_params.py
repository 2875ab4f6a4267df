"""Bad params -> one-line error naming the key, exit 1, no output file."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heimdall.cli import main


def _run_export(params_path, out, capsys):
    code = main(["export-sessions", "--params", str(params_path), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"export_sessions.source": "kafka"}, "export_sessions.source"),
        ({"export_sessions.n_sessions": -5}, "export_sessions.n_sessions"),
        ({"export_sessions.n_sessions": 0}, "export_sessions.n_sessions"),
        ({"export_sessions.sample_rate_hz": 0}, "export_sessions.sample_rate_hz"),
        ({"export_sessions.sample_rate_hz": -12000}, "export_sessions.sample_rate_hz"),
        ({"export_sessions.duration_s": 0}, "export_sessions.duration_s"),
        ({"scenario.shadowing_sigma_db": -1}, "scenario.shadowing_sigma_db"),
        ({"scenario.tx_power_dbm": [47, 30]}, "scenario.tx_power_dbm"),
        ({"extract_features.n_mels": 63}, "extract_features.n_mels"),
        ({"extract_features.split.strategy": "alphabetical"}, "extract_features.split.strategy"),
        ({"extract_features.split.strategy": "time", "extract_features.split.test_from": "last tuesday"},
         "extract_features.split.test_from"),
        ({"extract_features.split.strategy": "list"}, "needs test_ids_file"),
        ({"extract_features.split.strategy": "list", "extract_features.split.test_ids_file": "/etc/passwd"},
         "extract_features.split.test_ids_file"),
        ({"extract_features.split.strategy": "list", "extract_features.split.test_ids_file": "splits/../x.txt"},
         "extract_features.split.test_ids_file"),
        ({"extract_features.split.strategy": "area", "extract_features.split.test_area": [41, -111, 40, -110]},
         "extract_features.split.test_area"),
        ({"extract_features.split.test_area": [40, -112, 41, -111]}, "only apply to strategy 'area'"),
        ({"extract_features.split.strategy": "area", "extract_features.split.test_area": [40, -112, 41, -111],
          "extract_features.split.test_fraction": 0}, "production run"),
        ({"extract_features.split.test_fraction": -0.1}, "extract_features.split.test_fraction"),
        ({"model.likelihood_nu": -1}, "model.likelihood_nu"),
        ({"train.radio_map.uncertainty": "maybe"}, "train.radio_map.uncertainty"),
        ({"train.radio_map.gp": "dense"}, "train.radio_map.gp"),
        ({"train.max_samples": 0}, "train.max_samples"),
        # issue 20: a bool is not a number, seeds are 32-bit, coordinates are coordinates, NaN is no value
        ({"train.max_epochs": True}, "train.max_epochs"),
        ({"export_sessions.n_sessions": True}, "export_sessions.n_sessions"),
        ({"train.lr": False}, "train.lr"),
        ({"train.devices": True}, "train.devices"),
        ({"train.seed": 2**32}, "train.seed"),
        ({"scenario.seed": 2**40}, "scenario.seed"),
        ({"export_sessions.seed": -1}, "export_sessions.seed"),
        ({"extract_features.split.seed": 2**32}, "extract_features.split.seed"),
        ({"extract_features.origin": [500, 900]}, "extract_features.origin"),
        ({"extract_features.origin": [45.0, 181.0]}, "extract_features.origin"),
        ({"extract_features.origin": [float("nan"), 7.0]}, "extract_features.origin"),
        ({"scenario.tx_power_dbm": [float("nan"), 47]}, "scenario.tx_power_dbm"),
        ({"scenario.doppler_hz": [1.0, float("inf")]}, "scenario.doppler_hz"),
        ({"bogus_section": {"a": 1}}, "bogus_section"),
    ],
)
def test_bad_param_is_one_line_error_and_no_output(make_params, tmp_path, capsys, override, expected):
    out = tmp_path / "sessions.h5"
    code, err = _run_export(make_params(**override), out, capsys)
    assert code == 1
    assert len(err.splitlines()) == 1, err
    assert expected in err
    assert not out.exists()


def test_fewer_than_three_receivers_rejected(make_params, tmp_path, capsys):
    from conftest import tiny_params_dict, write_params

    d = tiny_params_dict()
    d["scenario"]["receivers"] = d["scenario"]["receivers"][:2]
    out = tmp_path / "sessions.h5"
    code, err = _run_export(write_params(tmp_path / "p.yaml", d), out, capsys)
    assert code == 1 and "scenario.receivers" in err and "at least 3" in err
    assert not out.exists()


@pytest.mark.parametrize(("key", "value"), [("latitude", 91.0), ("latitude", -90.5), ("longitude", 180.5),
                                            ("longitude", float("nan"))])
def test_receiver_position_out_of_range_rejected(tmp_path, capsys, key, value):
    from conftest import tiny_params_dict, write_params

    d = tiny_params_dict()
    d["scenario"]["receivers"][1][key] = value
    out = tmp_path / "sessions.h5"
    code, err = _run_export(write_params(tmp_path / "p.yaml", d), out, capsys)
    assert code == 1 and len(err.splitlines()) == 1 and f"scenario.receivers.1.{key}" in err
    assert not out.exists()


def test_bounds_are_inclusive_and_booleans_stay_booleans(make_params):
    from heimdall.params import SEED_MAX, load_params

    p = load_params(make_params(**{"train.seed": SEED_MAX, "extract_features.origin": [-90, 180],
                                   "train.radio_map.uncertainty": True}))
    assert p.train.seed == SEED_MAX and p.extract_features.origin == (-90.0, 180.0)
    assert p.train.radio_map.uncertainty is True


def test_all_problems_listed_together_and_unknown_keys(make_params, capsys):
    path = make_params(**{"export_sessions.n_sessions": 0, "extract_features.n_fftt": 128})
    assert main(["validate", "--params", str(path)]) == 1
    err = capsys.readouterr().err
    assert "export_sessions.n_sessions" in err and "extract_features.n_fftt" in err
    assert len(err.strip().splitlines()) == 1


def test_previous_output_left_intact_when_stage_fails(make_params, tmp_path, capsys):
    out = tmp_path / "sessions.h5"
    out.write_bytes(b"output of an earlier run")
    code, _ = _run_export(make_params(**{"export_sessions.n_sessions": 0}), out, capsys)
    assert code == 1 and out.read_bytes() == b"output of an earlier run"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_cli_exit_code_in_a_real_process(make_params, tmp_path):
    out = tmp_path / "sessions.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "heimdall", "export-sessions", "--params",
         str(make_params(**{"export_sessions.source": "kafka"})), "--out", str(out)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("heimdall export-sessions: error:")
    assert not out.exists()


def test_help_for_every_verb():
    for verb in ("export-sessions", "extract-features", "validate"):
        proc = subprocess.run([sys.executable, "-m", "heimdall", verb, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "--params" in proc.stdout


def test_split_dates_survive_yaml_and_dvc_set(make_params, tmp_path):
    """An unquoted date (what `dvc exp run -S extract_features.split.test_from=2022-11-01` writes) is
    read by YAML as a date: it is accepted and kept as its ISO text, and the split uses it."""
    from heimdall.params import load_params

    path = make_params(**{"extract_features.split.strategy": "time"})
    text = path.read_text().replace("test_from: null", "test_from: 2022-11-01").replace(
        "test_until: null", "test_until: 2022-12-01T06:00:00+01:00")
    path.write_text(text)
    split = load_params(path).extract_features.split
    assert (split.test_from, split.test_until) == ("2022-11-01", "2022-12-01T06:00:00+01:00")


def _leaves(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out += _leaves(v, key + ".") if isinstance(v, dict) else [key]
    return out


_ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.floats(allow_nan=True),
    st.text(max_size=8), st.lists(st.floats(allow_nan=True), max_size=5),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_any_corrupted_param_loads_valid_or_is_one_line_error(tmp_path, data):
    """Property (issue 20): whatever value lands on whatever key (or a new key), load_params either
    returns params whose seeds are 32-bit, floats finite and origin a coordinate, or raises one
    HeimdallError line naming that key — never another exception."""
    import math

    from conftest import tiny_params_dict, write_params

    from heimdall.errors import HeimdallError
    from heimdall.params import load_params

    base = tiny_params_dict()
    keys = _leaves(base) + ["bogus_top", "train.bogus_key"]
    overrides = data.draw(st.dictionaries(st.sampled_from(keys), _ANY_VALUE, min_size=1, max_size=3))
    d = tiny_params_dict(**overrides)
    path = write_params(tmp_path / "p.yaml", d)
    try:
        p = load_params(path)
    except HeimdallError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith(f"{path}: invalid params: ")
        assert any(f" {k.split('.')[0]}" in msg for k in overrides), msg  # names the section it broke
        return
    dumped = p.model_dump(mode="python")

    def floats(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from floats(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from floats(v)
        elif isinstance(x, float):
            yield x
    assert all(math.isfinite(x) for x in floats(dumped))
    for seed in (p.scenario.seed, p.export_sessions.seed, p.extract_features.split.seed, p.train.seed):
        assert type(seed) is int and 0 <= seed <= 2**32 - 1
    assert type(p.train.max_epochs) is int and type(p.export_sessions.n_sessions) is int
    if p.extract_features.origin is not None:
        lat, lon = p.extract_features.origin
        assert abs(lat) <= 90 and abs(lon) <= 180
    assert "bogus_top" not in overrides and "train.bogus_key" not in overrides


def test_max_samples_bounds_the_epochs_of_a_large_campaign():
    from conftest import default_params_dict

    from heimdall.params import Params

    tp = Params.model_validate(default_params_dict()).train
    assert (tp.max_epochs, tp.max_samples) == (40, 300_000)
    assert tp.epochs(4_200) == 40  # the default campaign: its 168,000 samples are within the budget
    assert tp.epochs(16_800) == 18 and tp.epochs(70_000) == 5  # 24k and 100k sessions (70 % train)
    assert tp.epochs(10**9) == 1
