"""The interface every execution strategy implements.

A runner decides where the shared poller code runs. The server's lifespan
calls :meth:`Runner.start` on startup and :meth:`Runner.stop` on shutdown,
both on the server's event loop; everything else is the runner's own.
"""

from __future__ import annotations

import abc
import enum
import logging
import os
from typing import ClassVar

from bgapi.errors import RunnerError
from bgapi.poller import Poller

__all__ = ["RunState", "Runner"]

logger = logging.getLogger(__name__)

# How long stop() waits for the poll in flight before it gives up on it.
DEFAULT_STOP_TIMEOUT_S = 1.5


class RunState(enum.StrEnum):
    """The lifecycle stage of a runner."""

    IDLE = "idle"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"
    # Another process holds the deployment's poller lock; this one serves the API.
    STANDBY = "standby"


class Runner(abc.ABC):
    """Run a :class:`Poller`'s schedule somewhere, start it and stop it."""

    mode: ClassVar[str]

    def __init__(self, poller: Poller) -> None:
        self.poller = poller
        self.state = RunState.IDLE
        self.error: str | None = None

    @property
    def alive(self) -> bool:
        """True while the runner is starting or running."""
        return self.state in (RunState.STARTING, RunState.RUNNING)

    @property
    def polling(self) -> bool:
        """True while this process runs the schedule (False for a standby)."""
        return self.alive

    @property
    def poller_pid(self) -> int | None:
        """The id of the process that runs the deployment's schedule, None if unknown."""
        return os.getpid() if self.polling else None

    async def start(self) -> None:
        """Start polling. Call once, from the server's event loop.

        Raises:
            RunnerError: the runner was already started.
        """
        if self.state is not RunState.IDLE:
            raise RunnerError(f"cannot start the {self.mode} runner: it is {self.state}")
        self.state = RunState.STARTING
        await self._start()
        logger.info("poller started in %s mode with %d target(s)", self.mode, len(self.poller.enabled_targets))

    async def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """Stop polling and wait at most ``timeout`` seconds for the poll in flight.

        Calling it again, or on a runner that never started, does nothing.
        """
        if self.state in (RunState.IDLE, RunState.STOPPED, RunState.STOPPING):
            return
        crashed = self.state is RunState.CRASHED
        self.state = RunState.STOPPING
        await self._stop(timeout)
        self.state = RunState.CRASHED if crashed else RunState.STOPPED
        stats = self.poller.stats.snapshot()
        logger.info(
            "poller stopped after %d run(s), %d missed slot(s)", stats["runs"], stats["missed"]
        )

    def report_crash(self, error: BaseException) -> None:
        """Mark the runner as dead and log why; /healthz turns unhealthy."""
        self.state = RunState.CRASHED
        self.error = f"{type(error).__name__}: {error}"
        logger.error(
            "the %s poller died and polls no more: %s", self.mode, self.error, exc_info=error
        )

    @abc.abstractmethod
    async def _start(self) -> None:
        """Start the strategy; return once it is scheduled to run."""

    @abc.abstractmethod
    async def _stop(self, timeout: float) -> None:
        """Stop the strategy and release what it owns, within ``timeout`` seconds."""
