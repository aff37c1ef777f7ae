"""Execution strategies: one module per strategy behind :class:`Runner`."""

from __future__ import annotations

from bgapi.errors import ConfigError
from bgapi.poller import Poller
from bgapi.runners.base import Runner, RunState

__all__ = ["RunState", "Runner", "create_runner"]


def create_runner(mode: str, poller: Poller) -> Runner:
    """Return the runner for ``mode``: "thread", "asyncio", "apscheduler" or "process".

    Raises:
        ConfigError: the mode is unknown, or its optional extra is not installed.
    """
    if mode == "thread":
        from bgapi.runners.thread import ThreadRunner

        return ThreadRunner(poller)
    if mode == "asyncio":
        from bgapi.runners.asyncio_task import AsyncioRunner

        return AsyncioRunner(poller)
    if mode == "apscheduler":
        try:
            from bgapi.runners.apscheduler import APSchedulerRunner
        except ImportError as exc:
            raise ConfigError(
                [
                    f"mode 'apscheduler' needs APScheduler 3 ({exc}); install it with: "
                    "pip install 'bgapi[apscheduler]'"
                ]
            ) from None
        return APSchedulerRunner(poller)
    if mode == "process":
        from bgapi.runners.process import ProcessRunner

        return ProcessRunner(poller)
    raise ConfigError([f"unknown mode {mode!r}; use thread, asyncio, apscheduler or process"])
