"""`tritonasr gateway`'s settings: every number is checked, NaN included (it compares false with
everything, so a check written `value <= 0` would let it through)."""
from __future__ import annotations

import argparse

import pytest

from tritonasr.gateway import cli as gateway_cli
from tritonasr.gateway.settings import GatewaySettings


@pytest.mark.parametrize("name", ["max_audio_seconds", "queue_timeout_s", "request_timeout_s", "job_lease_s"])
def test_positive_settings_refuse_nan_zero_and_less(name):
    for value in (float("nan"), 0.0, -1.0):
        with pytest.raises(ValueError, match=f"{name} must be positive"):
            GatewaySettings(**{name: value})


def test_retention_refuses_nan_and_negative_and_keeps_zero():
    assert GatewaySettings(job_retention_days=0).job_retention_days == 0
    for value in (float("nan"), -0.5):
        with pytest.raises(ValueError, match="job_retention_days must be 0 or more"):
            GatewaySettings(job_retention_days=value)


def test_drain_seconds_refuses_nan_and_negative(monkeypatch, capsys):
    monkeypatch.delenv("TRITONASR_API_KEY", raising=False)
    parser = argparse.ArgumentParser()
    gateway_cli.add_arguments(parser)
    for value in ("nan", "-1"):
        assert gateway_cli.main(parser.parse_args(["--drain-seconds", value])) == 2
        assert "--drain-seconds must be 0 or more" in capsys.readouterr().err
