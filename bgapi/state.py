"""Per-target up/down state and the poller's run statistics.

Both live in memory, are updated by whichever thread runs the poller and are
read by the API server, so every read and write goes through a lock.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from bgapi.poll import PollResult, format_timestamp

__all__ = ["LatenessStats", "State", "TargetStatus", "Transition"]

# Lateness percentiles are computed over this many of the most recent runs.
LATENESS_WINDOW = 10_000


class State(enum.StrEnum):
    """A target's state: unknown until enough consecutive results agree."""

    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of a target's state."""

    previous: State
    current: State

    @property
    def is_recovery(self) -> bool:
        """True for down to up; unknown to up is a first success, not a recovery."""
        return self.previous is State.DOWN and self.current is State.UP


@dataclass(slots=True)
class TargetStatus:
    """The live state of one target, as the API shows it."""

    name: str
    state: State = State.UNKNOWN
    consecutive_successes: int = 0
    consecutive_failures: int = 0
    last_result: PollResult | None = None
    last_success_at: float | None = None
    last_change_at: float | None = None
    next_run_at: float | None = None
    runs: int = 0
    missed: int = 0

    def apply(self, result: PollResult, success_threshold: int, failure_threshold: int) -> Transition | None:
        """Count ``result`` and flip the state once a threshold is reached.

        Returns the transition, or None when the state stays the same.
        """
        self.last_result = result
        if result.ok:
            self.consecutive_successes += 1
            self.consecutive_failures = 0
            self.last_success_at = result.started_at
            reached = State.UP if self.consecutive_successes >= success_threshold else None
        else:
            self.consecutive_failures += 1
            self.consecutive_successes = 0
            reached = State.DOWN if self.consecutive_failures >= failure_threshold else None
        if reached is None or reached is self.state:
            return None
        transition = Transition(self.state, reached)
        self.state = reached
        self.last_change_at = result.started_at
        return transition

    def to_dict(self) -> dict[str, Any]:
        """Return the status as JSON-ready data."""
        return {
            "name": self.name,
            "state": str(self.state),
            "consecutive_successes": self.consecutive_successes,
            "consecutive_failures": self.consecutive_failures,
            "last_result": self.last_result.to_dict() if self.last_result else None,
            "last_success_at": _iso(self.last_success_at),
            "last_change_at": _iso(self.last_change_at),
            "next_run_at": _iso(self.next_run_at),
            "runs": self.runs,
            "missed": self.missed,
        }


@dataclass
class LatenessStats:
    """Run counts and start lateness over all targets, safe to share between threads."""

    started_at: float = field(default_factory=time.time)
    runs: int = 0
    missed: int = 0
    first_run_at: float | None = None
    _lateness_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENESS_WINDOW))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record_run(self, lateness_ms: float) -> None:
        """Count one scheduled run that started ``lateness_ms`` after its slot."""
        with self._lock:
            self.runs += 1
            if self.first_run_at is None:
                self.first_run_at = time.time()
            self._lateness_ms.append(lateness_ms)

    def record_missed(self, count: int) -> None:
        """Count slots that were skipped because the previous poll still ran."""
        with self._lock:
            self.missed += count

    def snapshot(self) -> dict[str, Any]:
        """Return totals and lateness p50/p99/max in milliseconds."""
        with self._lock:
            samples = sorted(self._lateness_ms)
            runs, missed = self.runs, self.missed
        return {
            "uptime_s": round(time.time() - self.started_at, 3),
            "runs": runs,
            "missed": missed,
            "lateness_ms": {
                "p50": _percentile(samples, 0.50),
                "p99": _percentile(samples, 0.99),
                "max": samples[-1] if samples else None,
                "samples": len(samples),
            },
        }


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else format_timestamp(timestamp)


def _percentile(sorted_samples: list[float], fraction: float) -> float | None:
    if not sorted_samples:
        return None
    index = min(len(sorted_samples) - 1, int(round(fraction * (len(sorted_samples) - 1))))
    return sorted_samples[index]
