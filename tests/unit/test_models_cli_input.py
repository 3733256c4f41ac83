"""`myelin models register --meta`: any bytes in META.json give a typed, actionable error
(or a valid document), never a traceback; decided before anything is contacted."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from myelin.models_cli import MetaError, RegisterMeta, load_meta

VALID = {
    "name": "ctr",
    "provenance": {"features": ["a"], "feature_view": "v", "training_window": [1, 2]},
    "metrics": {"auc": 0.7},
}


def _load(data: bytes) -> RegisterMeta:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "meta.json"
        path.write_bytes(data)
        return load_meta(path)


def _outcome(data: bytes) -> RegisterMeta | MetaError:
    try:
        return _load(data)
    except MetaError as exc:
        return exc


@hsettings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_refused_with_a_reason(data: bytes) -> None:
    got = _outcome(data)  # anything else raised fails the test
    if isinstance(got, MetaError):
        assert "meta.json" in got.message and got.code == "invalid_model_meta"
    else:
        assert isinstance(got, RegisterMeta)


@hsettings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=12,
    )
)
def test_arbitrary_json_is_refused_with_a_reason(doc: object) -> None:
    got = _outcome(json.dumps(doc).encode())
    if isinstance(got, MetaError):
        assert got.message.startswith(str(Path(tempfile.gettempdir())))  # names the file


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"metrics": {"auc": "high"}}, "Expected `float`"),
        ({"provenance": {"features": "a"}}, "Expected `array`"),
        ({"extra": 1}, "unknown field `extra`"),
        ({"name": None}, "Expected `str`"),
    ],
)
def test_each_problem_is_named(change: dict[str, object], problem: str) -> None:
    with pytest.raises(MetaError, match=problem):
        _load(json.dumps({**VALID, **change}).encode())
    assert _load(json.dumps(VALID).encode()).name == "ctr"
