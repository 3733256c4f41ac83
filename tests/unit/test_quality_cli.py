"""`myelin models quality` refuses a bad cohort before it connects to anything."""

from __future__ import annotations

import subprocess
import sys

import pytest

from myelin.models import LabelSource
from myelin.quality import quality_sql


def test_a_bad_cohort_is_one_clear_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "myelin.cli", "models", "quality", "ctr", "--cohort", "clicks:x"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "use FEATURE:WIDTH" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("model", "feature", "width", "problem"),
    [
        ("ctr; DROP", "", 1.0, "not a plain identifier"),
        ("ctr", "clicks'1h", 1.0, "not a plain identifier"),
        ("ctr", "clicks_1h", 0.0, "must be positive"),
    ],
)
def test_quality_sql_takes_identifiers_only(
    model: str, feature: str, width: float, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        quality_sql(
            model, LabelSource(event_type="click"), cohort_feature=feature, cohort_width=width
        )
