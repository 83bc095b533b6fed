"""History timestamps: the engine's fast UTC formatting is exactly datetime's."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from hypothesis import example, given
from hypothesis import strategies as st

from checkmate.stage import _iso


@given(st.floats(min_value=0, max_value=2**35, allow_nan=False, allow_infinity=False))
@example(0.0)
@example(0.5e-6)  # half a microsecond: rounds to even (0)
@example(1.5e-6)  # rounds to even (2)
@example(1_700_000_000.9999995)  # rounds up into the next second
@example(1_700_000_000.0)  # no fraction: isoformat leaves it out
def test_utc_timestamps_format_exactly_as_datetime_does(timestamp: float) -> None:
    expected = datetime.fromtimestamp(timestamp, ZoneInfo("UTC")).isoformat()
    assert _iso(timestamp, "UTC") == expected


@given(st.floats(min_value=-(2**31), max_value=2**33, allow_nan=False, allow_infinity=False))
def test_other_zones_and_early_timestamps_use_datetime(timestamp: float) -> None:
    for zone in ("Europe/Paris", "UTC"):
        expected = datetime.fromtimestamp(timestamp, ZoneInfo(zone)).isoformat()
        assert _iso(timestamp, zone) == expected
