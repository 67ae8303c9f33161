"""HISTORY_KEEP_DAYS: read once, and beat folds history hourly only when it is set."""

from __future__ import annotations

import pytest

from worker.celery_config import beat_schedule
from worker.errors import ConfigError
from worker.models import RestoreOptions, VerifyOptions
from worker.settings import Settings


def test_history_is_kept_for_ever_by_default() -> None:
    settings = Settings.from_env({})
    assert settings.history_keep_days == 0
    assert "prune-history" not in beat_schedule(settings)


def test_history_keep_days_schedules_an_hourly_fold() -> None:
    entry = beat_schedule(Settings.from_env({"HISTORY_KEEP_DAYS": "30"}))["prune-history"]
    assert entry["task"] == "worker.tasks.prune_history"
    assert entry["kwargs"] == {"older_than_days": 30}
    assert entry["schedule"].run_every.total_seconds() == 3600


@pytest.mark.parametrize("value", ["-1", "thirty", "100001"])
def test_a_bad_history_keep_days_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="HISTORY_KEEP_DAYS"):
        Settings.from_env({"HISTORY_KEEP_DAYS": value})


def test_as_of_travels_with_the_options() -> None:
    options = RestoreOptions(force=True, as_of="2026-02-12T10:00:00+00:00")
    again = RestoreOptions.from_dict(options.as_dict())
    assert again == options
    assert again.moment is not None
    assert again.keep_replaced
    assert VerifyOptions.from_dict({"as_of": None}).moment is None
