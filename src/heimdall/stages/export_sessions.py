"""Stage export_sessions: labelled sessions from a source -> data/sessions.h5.

``source: synthetic`` (default) simulates a WebSDR campaign; ``source: postgres`` reads approved
sessions from the production database (see docs/sources.md).
"""

from __future__ import annotations

from pathlib import Path

from heimdall.atomic import atomic_path
from heimdall.budget import check_export_sessions
from heimdall.errors import HeimdallError
from heimdall.params import Params
from heimdall.simulator import SIM_BLOCK_SESSIONS, export_campaign


def run(params: Params, out: Path, progress: bool = True) -> dict:
    source = params.export_sessions.source
    if source == "synthetic":  # before allocating (the postgres source checks once it knows its sessions)
        exp = params.export_sessions
        check_export_sessions(exp, exp.n_sessions, len(params.scenario.receivers), SIM_BLOCK_SESSIONS, out)
    with atomic_path(out) as tmp:
        if source == "synthetic":
            summary = export_campaign(params, tmp, progress)
        elif source == "postgres":
            from heimdall.db.source import export_postgres  # psycopg2/boto3 only when needed

            summary = export_postgres(params, tmp, progress)
        else:
            raise HeimdallError(
                f"export_sessions.source: '{source}' is not available in this version of heimdall"
            )
    return summary
