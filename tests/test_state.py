"""Per-target state: thresholds, transitions and the ``on`` rules of actions."""

from __future__ import annotations

import threading

import pytest

from bgapi.actions import should_fire
from bgapi.config import ActionConfig
from bgapi.poll import PollResult
from bgapi.state import LatenessStats, State, TargetStatus, Transition


def _result(ok: bool, started_at: float = 1000.0) -> PollResult:
    return PollResult(
        target="t", ok=ok, scheduled_at=started_at, started_at=started_at, elapsed_ms=1.0
    )


def _feed(
    status: TargetStatus, pattern: str, success: int = 1, failure: int = 1
) -> list[Transition | None]:
    """Apply one result per character of ``pattern`` ('+' ok, '-' failed)."""
    return [
        status.apply(_result(char == "+", 1000.0 + index), success, failure)
        for index, char in enumerate(pattern)
    ]


def test_starts_unknown() -> None:
    status = TargetStatus("t")

    assert status.state is State.UNKNOWN
    assert status.last_result is None
    assert status.to_dict()["state"] == "unknown"


def test_unknown_to_down_after_failure_threshold() -> None:
    status = TargetStatus("t")

    transitions = _feed(status, "--", failure=3)
    assert transitions == [None, None]
    assert status.state is State.UNKNOWN
    assert status.consecutive_failures == 2

    third = status.apply(_result(False), 1, 3)
    assert third == Transition(State.UNKNOWN, State.DOWN)
    assert status.state is State.DOWN


def test_unknown_to_up_after_success_threshold() -> None:
    status = TargetStatus("t")

    transitions = _feed(status, "++", success=2)

    assert transitions == [None, Transition(State.UNKNOWN, State.UP)]
    assert status.state is State.UP
    assert status.last_success_at == 1001.0
    assert status.last_change_at == 1001.0


def test_flips_both_ways_with_thresholds() -> None:
    status = TargetStatus("t")

    transitions = _feed(status, "++" + "--" + "-" + "+" + "++", success=2, failure=3)

    assert transitions == [
        None,
        Transition(State.UNKNOWN, State.UP),
        None,
        None,
        Transition(State.UP, State.DOWN),
        None,
        Transition(State.DOWN, State.UP),
        None,
    ]


def test_interrupted_streak_resets_count() -> None:
    status = TargetStatus("t")

    transitions = _feed(status, "--+--", success=2, failure=3)

    assert transitions == [None] * 5
    assert status.state is State.UNKNOWN
    assert status.consecutive_failures == 2
    assert status.consecutive_successes == 0


def test_steady_state_has_no_transition() -> None:
    status = TargetStatus("t")

    transitions = _feed(status, "+++++")

    assert transitions[0] == Transition(State.UNKNOWN, State.UP)
    assert transitions[1:] == [None] * 4
    assert status.consecutive_successes == 5


def test_last_success_kept_while_down() -> None:
    status = TargetStatus("t")

    _feed(status, "+--")

    assert status.state is State.DOWN
    assert status.last_success_at == 1000.0
    assert status.last_result is not None
    assert not status.last_result.ok


def test_recovery_means_down_to_up_only() -> None:
    assert Transition(State.DOWN, State.UP).is_recovery
    assert not Transition(State.UNKNOWN, State.UP).is_recovery
    assert not Transition(State.UP, State.DOWN).is_recovery


def test_to_dict_has_api_fields() -> None:
    status = TargetStatus("t")
    _feed(status, "+")

    document = status.to_dict()

    assert document["name"] == "t"
    assert document["state"] == "up"
    assert document["last_result"]["ok"] is True
    assert document["last_result"]["error_kind"] is None
    assert document["last_result"]["started_at"].endswith("+00:00")


# on rules ----------------------------------------------------------------------------

UNKNOWN_UP = Transition(State.UNKNOWN, State.UP)
UNKNOWN_DOWN = Transition(State.UNKNOWN, State.DOWN)
UP_DOWN = Transition(State.UP, State.DOWN)
DOWN_UP = Transition(State.DOWN, State.UP)


@pytest.mark.parametrize(
    ("on", "transition", "fires"),
    [
        ("change", None, False),
        ("change", UNKNOWN_UP, False),
        ("change", UNKNOWN_DOWN, True),
        ("change", UP_DOWN, True),
        ("change", DOWN_UP, True),
        ("down", None, False),
        ("down", UNKNOWN_UP, False),
        ("down", UNKNOWN_DOWN, True),
        ("down", UP_DOWN, True),
        ("down", DOWN_UP, False),
        ("up", None, False),
        ("up", UNKNOWN_UP, False),
        ("up", UNKNOWN_DOWN, False),
        ("up", UP_DOWN, False),
        ("up", DOWN_UP, True),
        ("always", None, True),
        ("always", UNKNOWN_UP, True),
        ("always", UP_DOWN, True),
    ],
)
def test_should_fire(on: str, transition: Transition | None, fires: bool) -> None:
    action = ActionConfig.model_validate({"type": "log", "on": on})

    assert should_fire(action, transition) is fires


def test_on_defaults_to_change() -> None:
    assert ActionConfig.model_validate({"type": "log"}).on == "change"


# Lateness statistics -----------------------------------------------------------------


def test_lateness_percentiles() -> None:
    stats = LatenessStats()
    for lateness in range(1, 101):
        stats.record_run(float(lateness))
    stats.record_missed(3)

    snapshot = stats.snapshot()

    assert snapshot["runs"] == 100
    assert snapshot["missed"] == 3
    assert snapshot["lateness_ms"]["max"] == 100.0
    assert snapshot["lateness_ms"]["p50"] in (50.0, 51.0)
    assert snapshot["lateness_ms"]["p99"] in (99.0, 100.0)
    assert snapshot["lateness_ms"]["samples"] == 100
    assert stats.first_run_at is not None


def test_lateness_empty() -> None:
    snapshot = LatenessStats().snapshot()

    assert snapshot["runs"] == 0
    assert snapshot["lateness_ms"] == {"p50": None, "p99": None, "max": None, "samples": 0}


def test_lateness_counts_from_threads() -> None:
    stats = LatenessStats()

    def record() -> None:
        for _ in range(1000):
            stats.record_run(1.0)
            stats.record_missed(1)

    threads = [threading.Thread(target=record) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert stats.snapshot()["runs"] == 4000
    assert stats.snapshot()["missed"] == 4000
