"""The HDF5 contracts in docs/data-contracts.md, the code's declaration and real files agree."""

from __future__ import annotations

import re

import h5py

from conftest import REPO_ROOT
from heimdall import contracts as c

DOC = REPO_ROOT / "docs" / "data-contracts.md"
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*([^|]+?)\s*\|\s*`?\(([^)]*)\)`?\s*\|\s*([^|]*?)\s*\|")


def _doc_tables() -> dict[str, dict[str, tuple[str, tuple[str, ...], str]]]:
    tables: dict = {}
    current = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            current = "sessions" if "sessions.h5" in line else "features" if "features.h5" in line else None
            continue
        m = ROW.match(line)
        if m and current:
            shape = tuple(s.strip() for s in m.group(3).split(",") if s.strip())
            tables.setdefault(current, {})[m.group(1)] = (m.group(2), shape, m.group(4))
    return tables


def _code(layout):
    return {f.path: (f.dtype, f.shape, f.unit) for f in layout}


def test_docs_match_declared_layouts():
    docs = _doc_tables()
    assert docs["sessions"] == _code(c.SESSIONS_LAYOUT)
    assert docs["features"] == _code(c.FEATURES_LAYOUT)


def test_docs_list_every_attribute():
    text = DOC.read_text()
    for name in list(c.SESSIONS_ATTRS) + list(c.FEATURES_ATTRS):
        assert f"`{name}`" in text, name


def test_real_files_match_layouts(tiny_campaign):
    params, sessions, features = tiny_campaign
    with h5py.File(sessions) as f:
        dims = c.validate_layout(f, c.SESSIONS_LAYOUT, sessions)
        assert dims == {"R": 7, "N": 240, "S": params.export_sessions.n_samples}
        assert set(c.SESSIONS_ATTRS) <= set(f.attrs)
        assert f.attrs["format"] == c.SESSIONS_FORMAT
    with h5py.File(features) as f:
        dims = c.validate_layout(f, c.FEATURES_LAYOUT, features)
        p = params.extract_features
        assert dims == {"R": 7, "N": 240, "M": p.n_mels, "F": p.n_frames}
        assert set(c.FEATURES_ATTRS) <= set(f.attrs)
