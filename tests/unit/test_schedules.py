"""Schedules, job definitions and the ``[scheduler]`` configuration: what an operator writes and
when the job then fires (all in UTC)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from server.config import ConfigError, load_settings
from stitchgraph.scheduler import JobDefinition, SchedulerSettings, parse_schedule

# A Wednesday.
NOW = datetime(2026, 3, 4, 12, 30, 30, tzinfo=UTC)


def next_fire(schedule: str, now: datetime = NOW) -> datetime:
    fire: datetime = parse_schedule(schedule).get_next_fire_time(None, now)
    return fire.astimezone(UTC)


def fires(schedule: str, count: int, now: datetime = NOW) -> list[datetime]:
    trigger = parse_schedule(schedule)
    found: list[datetime] = []
    previous = None
    moment = now
    for _ in range(count):
        fire = trigger.get_next_fire_time(previous, moment)
        found.append(fire.astimezone(UTC))
        previous, moment = fire, fire + timedelta(microseconds=1)
    return found


@pytest.mark.parametrize(("schedule", "seconds"), [
    ("every 1s", 1), ("every 30s", 30), ("every 5m", 300), ("every 6h", 21600), ("every 1d", 86400),
    ("Every 2H", 7200), ("  every 10 m ", 600),
])
def test_an_interval_fires_that_many_seconds_apart(schedule: str, seconds: int) -> None:
    first, second = fires(schedule, 2)
    assert second - first == timedelta(seconds=seconds)


def test_a_cron_expression_is_read_in_utc() -> None:
    assert next_fire("0 3 * * *") == datetime(2026, 3, 5, 3, 0, tzinfo=UTC)
    assert next_fire("*/15 * * * *") == datetime(2026, 3, 4, 12, 45, tzinfo=UTC)


@pytest.mark.parametrize("sunday", ["0", "7", "sun", "SUN"])
def test_day_of_week_zero_and_seven_are_sunday_as_in_crontab(sunday: str) -> None:
    assert next_fire(f"0 9 * * {sunday}") == datetime(2026, 3, 8, 9, 0, tzinfo=UTC)


def test_day_of_week_ranges_lists_and_steps_follow_crontab_numbering() -> None:
    assert [f.strftime("%a") for f in fires("0 9 * * 1-5", 5)] == ["Thu", "Fri", "Mon", "Tue", "Wed"]
    assert [f.strftime("%a") for f in fires("0 9 * * 0,6", 3)] == ["Sat", "Sun", "Sat"]
    assert [f.strftime("%a") for f in fires("0 9 * * */3", 3)] == ["Sat", "Sun", "Wed"]
    assert [f.strftime("%a") for f in fires("0 9 * * mon-wed", 3)] == ["Mon", "Tue", "Wed"]


@pytest.mark.parametrize(("schedule", "problem"), [
    ("every 0s", "between 1 second and 366 days"),
    ("every 400d", "between 1 second and 366 days"),
    ("every 6 weeks", "5-field cron"),
    ("hourly", "5-field cron"),
    ("", "5-field cron"),
    ("0 3 * *", "5-field cron"),
    ("61 * * * *", "not a valid cron expression"),
    ("0 9 * * 8", "not a valid cron expression"),
    ("0 9 * * 5-1", "not a valid cron expression"),
    ("0 9 1 * mon", "not both"),
])
def test_a_schedule_that_is_neither_is_refused_with_a_reason(schedule: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        parse_schedule(schedule)
    assert repr(schedule) in str(caught.value)


def test_a_job_definition_checks_its_id_kind_and_schedule() -> None:
    JobDefinition("cohort-pull-ph-1", "COHORT_PULL", "every 6h", target="cohortSources/ph-1")
    JobDefinition("maintenance", "MAINTENANCE", "")  # no schedule: runs only when asked
    with pytest.raises(ValueError, match="job_id"):
        JobDefinition("Cohort_Pull", "COHORT_PULL", "every 6h")
    with pytest.raises(ValueError, match="job_id"):
        JobDefinition("x" * 64, "COHORT_PULL", "every 6h")
    with pytest.raises(ValueError, match="kind"):
        JobDefinition("pull", "PULL", "every 6h")
    with pytest.raises(ValueError, match="schedule"):
        JobDefinition("pull", "COHORT_PULL", "every fortnight")


def test_scheduler_settings_default_to_the_documented_schedules() -> None:
    settings = load_settings(env={}).scheduler
    assert settings == SchedulerSettings()
    assert settings.enabled
    assert (settings.cohort_pull_schedule, settings.audience_evaluation_schedule,
            settings.audience_reconciliation_schedule, settings.maintenance_schedule) == (
        "every 6h", "every 5m", "0 3 * * *", "every 1h")


def test_the_scheduler_section_is_read_from_the_file(tmp_path: Path) -> None:
    config = tmp_path / "stitchgraph.toml"
    config.write_text('[scheduler]\nenabled = false\nleader_check_seconds = 2.5\n'
                      'audience_evaluation_schedule = "every 1m"\naudience_reconciliation_schedule = ""\n')
    settings = load_settings(config, env={}).scheduler
    assert not settings.enabled
    assert settings.leader_check_seconds == 2.5
    assert settings.audience_evaluation_schedule == "every 1m"
    assert settings.audience_reconciliation_schedule == ""


@pytest.mark.parametrize(("table", "key"), [
    ('maintenance_schedule = "every now and then"', "maintenance_schedule"),
    ('cohort_pull_schedule = ""', "cohort_pull_schedule"),
    ("leader_check_seconds = 0", "leader_check_seconds"),
    ("run_retention_days = -1", "run_retention_days"),
    ("jitter = 3", "unknown keys"),
])
def test_a_bad_scheduler_setting_names_its_key(tmp_path: Path, table: str, key: str) -> None:
    config = tmp_path / "stitchgraph.toml"
    config.write_text(f"[scheduler]\n{table}\n")
    with pytest.raises(ConfigError, match=key) as caught:
        load_settings(config, env={})
    assert str(caught.value).startswith("scheduler")


def test_the_old_window_interval_still_sets_the_evaluation_schedule(tmp_path: Path) -> None:
    config = tmp_path / "stitchgraph.toml"
    config.write_text("[audiences]\nwindow_interval_seconds = 90\n")
    assert load_settings(config, env={}).scheduler.audience_evaluation_schedule == "every 90s"
    config.write_text("[audiences]\nwindow_interval_seconds = 0\n")
    assert load_settings(config, env={}).scheduler.audience_evaluation_schedule == ""


def test_the_scheduler_schedule_wins_over_the_old_window_interval(tmp_path: Path) -> None:
    config = tmp_path / "stitchgraph.toml"
    config.write_text('[audiences]\nwindow_interval_seconds = 90\n\n[scheduler]\naudience_evaluation_schedule = '
                      '"*/10 * * * *"\n')
    assert load_settings(config, env={}).scheduler.audience_evaluation_schedule == "*/10 * * * *"
