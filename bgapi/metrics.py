"""Prometheus metrics of the poller, built from its state at scrape time.

A collector reads the poller's published statuses when Prometheus scrapes
``/metrics``, so polls do no metric bookkeeping of their own and every app has
its own registry (nothing global, nothing at import).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bgapi.poller import Poller
from bgapi.state import State

__all__ = ["create_registry"]

_STATE_VALUES = {State.DOWN: 0, State.UP: 1, State.UNKNOWN: -1}


class PollerCollector(Collector):
    """Expose per-target state, response time and run counts."""

    def __init__(self, poller: Poller) -> None:
        self._poller = poller

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily(
            "bgapi_target_up", "1 when the target is up, 0 when down, -1 while unknown.", labels=["target"]
        )
        elapsed = GaugeMetricFamily(
            "bgapi_target_response_seconds", "Duration of the target's last poll.", labels=["target"]
        )
        runs = CounterMetricFamily(
            "bgapi_target_runs", "Scheduled polls of the target.", labels=["target"]
        )
        missed = CounterMetricFamily(
            "bgapi_target_missed", "Slots skipped because the previous poll still ran.", labels=["target"]
        )
        for status in self._poller.statuses():
            up.add_metric([status.name], _STATE_VALUES[status.state])
            if status.last_result is not None:
                elapsed.add_metric([status.name], status.last_result.elapsed_ms / 1000)
            runs.add_metric([status.name], status.runs)
            missed.add_metric([status.name], status.missed)
        lateness = self._poller.stats.snapshot()["lateness_ms"]
        late = GaugeMetricFamily(
            "bgapi_poller_lateness_seconds",
            "Start lateness of recent scheduled polls: time from the slot to the start.",
            labels=["quantile"],
        )
        for quantile, key in (("0.5", "p50"), ("0.99", "p99"), ("1", "max")):
            if lateness[key] is not None:
                late.add_metric([quantile], lateness[key] / 1000)
        yield from (up, elapsed, runs, missed, late)


def create_registry(poller: Poller) -> CollectorRegistry:
    """Return a registry holding only this poller's metrics."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(PollerCollector(poller))
    return registry
