"""Stage export_sessions: labelled sessions from a source -> data/sessions.h5.

``source: synthetic`` (default) simulates a WebSDR campaign; ``source: postgres`` reads approved
sessions from the production database (see docs/sources.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from heimdall.atomic import atomic_path
from heimdall.errors import HeimdallError
from heimdall.params import Params
from heimdall.sessions_file import write_sessions
from heimdall.simulator import Scenario


def run(params: Params, out: Path, progress: bool = True) -> dict:
    source = params.export_sessions.source
    with atomic_path(out) as tmp:
        if source == "synthetic":
            summary = _export_synthetic(params, tmp, progress)
        elif source == "postgres":
            from heimdall.db.source import export_postgres  # psycopg2/boto3 only when needed

            summary = export_postgres(params, tmp, progress)
        else:
            raise HeimdallError(
                f"export_sessions.source: '{source}' is not available in this version of heimdall"
            )
    return summary


def _export_synthetic(params: Params, path: Path, progress: bool) -> dict:
    exp = params.export_sessions
    scenario = Scenario(params.scenario)
    campaign = scenario.draw_campaign(exp, exp.seed)
    n = exp.n_sessions
    scenario_json = json.dumps(params.scenario.model_dump(mode="json"), sort_keys=True)

    def blocks():
        for sl, arrays in scenario.iq_blocks(campaign, exp, exp.seed):
            present = campaign.present[sl]
            yield sl, {"present": present, "has_iq": present, **arrays}

    write_sessions(
        path,
        attrs={
            "source": "synthetic",
            "sample_rate_hz": float(exp.sample_rate_hz),
            "n_samples": exp.n_samples,
            "scenario_json": scenario_json,
            "campaign_seed": exp.seed,
        },
        receivers={
            "name": np.array(scenario.names, dtype=object),
            "station_id": np.array([f"sim-{i}" for i in range(scenario.n_receivers)], dtype=object),
            "latitude_deg": scenario.rx_lat,
            "longitude_deg": scenario.rx_lon,
            "altitude_m": scenario.rx_alt,
        },
        sessions={
            "session_id": campaign.session_id.astype(object),
            # i.i.d. transmitter positions: every session is its own transmitter
            "group_id": campaign.session_id.astype(object),
            "start_time_unix_s": campaign.start_time_unix_s,
            "frequency_hz": np.full(n, params.scenario.frequency_mhz * 1e6),
            "tx_latitude_deg": campaign.tx_latitude_deg,
            "tx_longitude_deg": campaign.tx_longitude_deg,
            "tx_power_dbm": campaign.tx_power_dbm,
        },
        n_samples=exp.n_samples,
        blocks=blocks(),
        progress=progress,
    )
    return {
        "source": "synthetic",
        "sessions": n,
        "receivers": scenario.n_receivers,
        "receiver_outages": int((~campaign.present).sum()),
    }
