"""bgapi inside your own FastAPI app: :class:`BackgroundPoller` and its lifespan.

A :class:`BackgroundPoller` owns everything that runs beside the app: the
SQLite store, the poller core, the HTTP clients of the server's loop, and the
runner (thread, asyncio task or APScheduler). Its :meth:`~BackgroundPoller.lifespan`
starts them on application startup and stops them on shutdown, in reverse
order. bgapi's own server (``bgapi run-all``) is built on the same class.

Example::

    from fastapi import FastAPI
    from bgapi import BackgroundPoller

    poller = BackgroundPoller.from_file("bgapi.toml", mode="asyncio")

    @poller.job(interval=30)
    def refresh_cache() -> None:
        ...

    app = FastAPI(lifespan=poller.lifespan)
    poller.add_api_routes(app, prefix="/bgapi")
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request

from bgapi.config import MODES, Config, config_from_dict, load_config
from bgapi.errors import ConfigError, RunnerError
from bgapi.jobs import Job, JobFunction, job
from bgapi.poll import PollResult
from bgapi.poller import LoopResources, Poller
from bgapi.runners import Runner, create_runner
from bgapi.state import TargetStatus
from bgapi.store import Store

__all__ = ["BackgroundPoller", "combine_lifespans", "get_poller"]

logger = logging.getLogger(__name__)

AppT = TypeVar("AppT")
Lifespan = Callable[[AppT], AbstractAsyncContextManager[Any]]


class BackgroundPoller:
    """HTTP targets and custom jobs, polled in the background of a FastAPI app.

    Build it, register jobs, then pass :meth:`lifespan` to ``FastAPI(...)``.
    Nothing starts before the app's startup.

    Args:
        config: A :class:`~bgapi.config.Config`, a dict shaped like the TOML
            file (``{"targets": [{"name": ..., "url": ...}], "store": {...}}``),
            or None for no HTTP targets and the default settings.
        mode: Where the schedule runs: ``"thread"``, ``"asyncio"``,
            ``"apscheduler"`` or ``"process"`` (HTTP targets only); the
            config's ``[poller] mode`` when None.
        jobs: Custom jobs made with :func:`bgapi.job`.
        poll: Run the schedule. False serves stored results and polls only on request.
        exclusive: Poll in only one process per store: the others serve the
            API from the store and take over when the polling process exits.
            False polls in every process that runs the lifespan.
        runner_factory: Build the runner from the poller core instead of
            looking ``mode`` up (``bgapi compare`` measures its peers this way).

    Raises:
        ConfigError: the config dict is invalid, or the mode is unknown and no
            ``runner_factory`` is given.
        ValueError: two jobs, or a job and a target, share a name.
    """

    def __init__(
        self,
        config: Config | Mapping[str, Any] | None = None,
        *,
        mode: str | None = None,
        jobs: Iterable[Job] = (),
        poll: bool = True,
        exclusive: bool = True,
        runner_factory: Callable[[Poller], Runner] | None = None,
    ) -> None:
        if config is None:
            config = config_from_dict({}, source="<BackgroundPoller>")
        elif not isinstance(config, Config):
            config = config_from_dict(config, source="<BackgroundPoller>")
        # With a runner_factory the mode is only a label (bgapi compare names its peers).
        if mode is not None and runner_factory is None and mode not in MODES:
            raise ConfigError([f"mode {mode!r} is unknown; use one of {', '.join(MODES)}"])
        self.config = config
        self.mode = mode or config.poller.mode
        self.poll = poll
        self.exclusive = exclusive
        self._runner_factory = runner_factory
        self.store = Store(config.store.path, config.store.retention)
        self.poller = Poller(config, self.store, self.mode if poll else None, jobs)
        self.runner: Runner | None = None
        self.resources: LoopResources | None = None
        self._exit_stack: AsyncExitStack | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **options: Any) -> BackgroundPoller:
        """Build a poller from a TOML configuration file; ``options`` are those of the class.

        Raises:
            ConfigError: the file is missing or invalid; one line per problem.
        """
        return cls(load_config(path), **options)

    # Jobs ---------------------------------------------------------------------------

    def add_job(self, job: Job) -> Job:
        """Register a job made with :func:`bgapi.job`; return it.

        Raises:
            RunnerError: the poller has already started.
            ValueError: a target or another job already has the job's name.
        """
        if self._exit_stack is not None:
            raise RunnerError(f"cannot add job {job.name!r}: the poller has already started")
        self.poller.add_job(job)
        return job

    def job(self, interval: float, **options: Any) -> Callable[[JobFunction], Job]:
        """Decorate a function to run every ``interval`` seconds, and register it.

        ``options`` are those of :func:`bgapi.job`: ``name``, ``timeout``,
        ``failure_threshold``, ``success_threshold``, ``actions``, ``enabled``.
        """
        make_job = job(interval, **options)

        def decorate(function: JobFunction) -> Job:
            return self.add_job(make_job(function))

        return decorate

    # Lifecycle ------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._exit_stack is not None

    @property
    def polling(self) -> bool:
        """True while this process runs the schedule; False on standby or before start."""
        return self.runner is not None and self.runner.polling

    async def start(self) -> None:
        """Open the store, load the stored states and start the runner.

        Call it from the event loop that serves the app; :meth:`lifespan` does.

        Raises:
            RunnerError: the poller is already running.
            StoreError: the store or the poller lock file cannot be opened.
            ConfigError: the mode's optional extra is not installed.
        """
        if self._exit_stack is not None:
            raise RunnerError("cannot start the poller: it is already running")
        async with AsyncExitStack() as stack:
            await asyncio.to_thread(self.store.open)
            stack.push_async_callback(asyncio.to_thread, self.store.close)
            await asyncio.to_thread(self.poller.restore)
            resources = LoopResources(self.config)
            stack.push_async_callback(resources.aclose)
            runner = self._create_runner() if self.poll else None
            for warning in self.config.startup_warnings():
                logger.warning("%s", warning)
            if runner is not None:
                await runner.start()
                stack.push_async_callback(runner.stop)
            self.runner, self.resources = runner, resources
            self._exit_stack = stack.pop_all()

    async def stop(self) -> None:
        """Stop the runner, then close the HTTP clients and the store; safe to call twice.

        :attr:`started` stays True until everything has closed, so a job that
        runs while the runner stops finds it True.
        """
        stack = self._exit_stack
        if stack is not None:
            try:
                await stack.aclose()
            finally:
                self._exit_stack = None

    @asynccontextmanager
    async def lifespan(self, app: FastAPI | None = None) -> AsyncIterator[None]:
        """Run the poller for the app's lifetime: ``FastAPI(lifespan=poller.lifespan)``.

        Sets ``app.state.bgapi`` to this object (see :func:`get_poller`), and
        the ``poller``, ``runner``, ``resources`` and ``metrics`` state that
        the routes of :meth:`add_api_routes` read. To keep a lifespan of your
        own, combine both with :func:`combine_lifespans`.
        """
        await self.start()
        try:
            if app is not None:
                from bgapi.metrics import create_registry

                app.state.bgapi = self
                app.state.poller = self.poller
                app.state.runner = self.runner
                app.state.resources = self.resources
                app.state.metrics = create_registry(self.poller)
            yield
        finally:
            await self.stop()

    def _create_runner(self) -> Runner:
        if self._runner_factory is not None:
            runner = self._runner_factory(self.poller)
        else:
            runner = create_runner(self.mode, self.poller)
        if not self.exclusive:
            return runner
        from bgapi.workers import ExclusiveRunner, PollerLock, lock_path_for, lock_retry_s

        intervals = [target.interval_s for target in self.poller.enabled_targets]
        lock = PollerLock(lock_path_for(self.store.path))
        return ExclusiveRunner(runner, lock, lock_retry_s(intervals))

    # State --------------------------------------------------------------------------

    def statuses(self) -> list[TargetStatus]:
        """Return a copy of every target's and job's status, in registration order.

        Safe from any thread and in every mode. A process on standby first
        reads the states that the polling process stored (one SQLite query).
        """
        self._refresh_if_standby()
        return self.poller.statuses()

    def status(self, name: str) -> TargetStatus | None:
        """Return a copy of one target's or job's status, or None for an unknown name."""
        self._refresh_if_standby()
        return self.poller.status(name)

    async def poll_now(self, name: str) -> PollResult:
        """Poll a target or run a job now, store the result and return it.

        Raises:
            KeyError: no target or job has this name.
            RunnerError: the poller has not started.
        """
        target = self.poller.target(name)
        if target is None:
            raise KeyError(f"no target or job named {name!r}")
        if self.resources is None:
            raise RunnerError(
                f"cannot poll {name!r}: the poller has not started; run the app's lifespan first"
            )
        if not self.polling:
            await asyncio.to_thread(self.poller.restore)
        return await self.poller.check(target, self.resources)

    def _refresh_if_standby(self) -> None:
        if self.started and not self.polling:
            self.poller.restore()

    # API ----------------------------------------------------------------------------

    def add_api_routes(self, app: FastAPI, prefix: str = "") -> None:
        """Add bgapi's endpoints (``/api/targets``, ``/api/poller``, ``/healthz``, ...) to ``app``.

        Jobs appear among the targets. ``prefix`` (for example ``"/bgapi"``)
        keeps them apart from the app's own routes. The app's lifespan must be
        this poller's, alone or combined.
        """
        from bgapi.server import add_api_routes

        router = APIRouter(prefix=prefix, tags=["bgapi"])
        add_api_routes(router, self.config)
        app.include_router(router)


def get_poller(request: Request) -> BackgroundPoller:
    """Return the app's :class:`BackgroundPoller`: a FastAPI dependency.

    Example::

        @app.get("/rates")
        def rates(poller: Annotated[BackgroundPoller, Depends(get_poller)]) -> dict:
            return {"state": poller.status("rates-api").state}

    Raises:
        RuntimeError: no BackgroundPoller lifespan runs in this app.
    """
    poller = getattr(request.app.state, "bgapi", None)
    if not isinstance(poller, BackgroundPoller):
        raise RuntimeError(  # noqa: TRY004 - a missing lifespan, not a wrong argument
            "no BackgroundPoller runs in this app; pass lifespan=poller.lifespan "
            "(or combine_lifespans(...)) to FastAPI()"
        )
    return poller


def combine_lifespans(
    *lifespans: Lifespan[AppT],
) -> Callable[[AppT], AbstractAsyncContextManager[Any]]:
    """Combine lifespans into one: startups run in the given order, shutdowns in reverse.

    Put your own lifespan first and the poller's last, so that jobs start
    after your resources exist and stop before they close::

        app = FastAPI(lifespan=combine_lifespans(app_lifespan, poller.lifespan))

    If a startup fails, the lifespans already started are shut down. Dicts
    that the lifespans yield are merged into the request state (Starlette's
    lifespan state). Async generator functions are accepted as well as
    async context manager factories.
    """
    factories = [
        asynccontextmanager(lifespan) if inspect.isasyncgenfunction(lifespan) else lifespan
        for lifespan in lifespans
    ]

    @asynccontextmanager
    async def combined(app: AppT) -> AsyncIterator[dict[str, Any] | None]:
        async with contextlib.AsyncExitStack() as stack:
            state: dict[str, Any] = {}
            for factory in factories:
                value = await stack.enter_async_context(factory(app))
                if isinstance(value, Mapping):
                    state.update(value)
            yield state or None

    return combined
