"""The JSON log renderer: one line per event, and no event can make it raise."""

from __future__ import annotations

import orjson
import pytest
import structlog

from mace.logging import configure_logging


def test_a_log_line_with_integer_keys_and_odd_values_is_written(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", json=True)
    try:
        structlog.get_logger("test").info("measured", by_threads={2: [1, 2]}, path=object.__new__(object))
        line = capsys.readouterr().err.strip().splitlines()[-1]
        event = orjson.loads(line)
        assert event["event"] == "measured"
        assert event["by_threads"] == {"2": [1, 2]}
        assert isinstance(event["path"], str)
    finally:
        structlog.reset_defaults()
