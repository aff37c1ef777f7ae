"""The FastAPI application: targets, results, poller statistics and health.

:func:`create_app` builds the app, and nothing starts until uvicorn runs its
lifespan. The lifespan opens the store and starts the runner. On shutdown it
stops scheduling, ends the poll in flight, closes the HTTP clients and then
closes the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from bgapi import __version__
from bgapi.background import BackgroundPoller
from bgapi.config import Config
from bgapi.errors import StoreError
from bgapi.jobs import Job
from bgapi.poll import format_timestamp
from bgapi.poller import Poller
from bgapi.runners import Runner
from bgapi.security import WriteGuard, describe_write_access, install_openapi_security
from bgapi.state import TargetStatus

__all__ = ["Server", "add_api_routes", "create_app", "run_server", "uvicorn_config"]

logger = logging.getLogger(__name__)

MAX_RESULTS_LIMIT = 1000
TargetName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")]


class ResultModel(BaseModel):
    """One poll of one target."""

    target: str
    ok: bool
    status_code: int | None
    elapsed_ms: float
    error_kind: str | None
    error: str | None
    failed_conditions: list[str]
    scheduled_at: str
    started_at: str
    lateness_ms: float | None


class TargetModel(BaseModel):
    """A target's or custom job's configuration summary and live state.

    A job (``kind`` "job") has no ``url`` or ``method``, and no ``timeout_s``
    unless one was given.
    """

    name: str
    kind: Literal["http", "job"]
    url: str | None
    method: str | None
    enabled: bool
    interval_s: float
    timeout_s: float | None
    state: Literal["up", "down", "unknown"]
    last_result: ResultModel | None
    consecutive_successes: int
    consecutive_failures: int
    last_success_at: str | None
    last_change_at: str | None
    next_run_at: str | None
    runs: int
    missed: int


class LatenessModel(BaseModel):
    """Start lateness of scheduled runs in milliseconds, over the recent runs."""

    p50: float | None
    p99: float | None
    max: float | None
    samples: int


class PollerModel(BaseModel):
    """The runner and its totals over all targets."""

    mode: str | None
    state: str
    uptime_s: float
    runs: int
    missed: int
    lateness_ms: LatenessModel
    targets: int
    first_run_at: str | None
    error: str | None
    polling: bool
    worker_pid: int
    poller_pid: int | None


class HealthModel(BaseModel):
    """Whether the server and its poller work."""

    status: Literal["ok", "unhealthy"]
    poller: str
    reason: str | None = None


class ErrorModel(BaseModel):
    """An error response."""

    detail: str


_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorModel, "description": "No target has this name."}
}


def create_app(
    config: Config,
    *,
    mode: str | None = None,
    poll: bool = True,
    runner_factory: Callable[[Poller], Runner] | None = None,
) -> FastAPI:
    """Build the API app for ``config``.

    Args:
        config: A validated configuration.
        mode: The strategy to run the poller with; the config's default when None.
        poll: Run the schedule. False serves stored results and polls only on request.
        runner_factory: Build the runner from the poller instead of looking
            ``mode`` up; ``bgapi compare`` passes the peers it measures this way.
    """
    # The store, the poller, its runner and the poller lock (one polling
    # process per store) are the BackgroundPoller's; see bgapi.background.
    background = BackgroundPoller(config, mode=mode, poll=poll, runner_factory=runner_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with background.lifespan(app):
            level, access = describe_write_access(
                app.state.listen_host, config.server.token, config.server.token_env
            )
            logger.log(level, "%s", access)
            # Move what lives as long as the server (config, targets, parsed
            # conditions, routes) out of the cycle collector's view. Its full
            # collections then scan only what polls allocate, so GC pauses and
            # the exit with thousands of targets get shorter.
            gc.freeze()
            yield

    app = FastAPI(
        title="bgapi",
        version=__version__,
        summary="Background HTTP poller: target states, results and poller statistics.",
        lifespan=lifespan,
        # /docs is served by _add_offline_docs, from files installed with bgapi.
        docs_url=None,
        # On the app, not per route, so that every write endpoint is covered.
        dependencies=[
            Depends(
                WriteGuard(
                    config.server.token, config.server.token_env, config.server.allowed_hosts
                ).dependency()
            )
        ],
    )
    # run_server() replaces this with the address it binds; the write rules depend on it.
    app.state.listen_host = config.server.host
    _add_routes(app, config)
    _add_offline_docs(app)
    install_openapi_security(app)
    return app


def _add_offline_docs(app: FastAPI) -> None:
    """Serve Swagger UI at /docs from the swagger-ui-bundle package, not a CDN.

    FastAPI's default page loads its scripts from a CDN, so it stays blank on a
    machine without internet access, where bgapi is often run.
    """
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="bgapi API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="data:,",
        )


def add_api_routes(app: FastAPI | APIRouter, config: Config) -> None:
    """Add bgapi's endpoints to ``app``.

    They read ``poller``, ``runner``, ``resources`` and ``metrics`` from the
    app's state, which :meth:`BackgroundPoller.lifespan` sets.
    """
    _add_routes(app, config)


def _add_routes(app: FastAPI | APIRouter, config: Config) -> None:
    def poller_of(request: Request) -> Poller:
        return request.app.state.poller  # type: ignore[no-any-return]

    def runner_of(request: Request) -> Runner | None:
        return request.app.state.runner  # type: ignore[no-any-return]

    def serves_from_store(request: Request) -> bool:
        # A standby worker (or `bgapi serve`) shows what the polling process stored.
        runner = runner_of(request)
        return runner is None or not runner.polling

    def fresh_poller(request: Request) -> Poller:
        poller = poller_of(request)
        if serves_from_store(request):
            with store_errors_as_503():
                poller.restore()
        return poller

    # The last store read error that was logged, so that each is logged once.
    logged_read_error: str | None = None

    @contextlib.contextmanager
    def store_errors_as_503() -> Iterator[None]:
        # A store that cannot be read (deleted, locked, a disk error) is a
        # server-side failure that the client can retry.
        nonlocal logged_read_error
        try:
            yield
        except StoreError as exc:
            message = config.redact(str(exc))
            if message != logged_read_error:
                logger.warning("%s; requests that read the store get 503 until it can be read", message)
                logged_read_error = message
            raise HTTPException(503, message) from None
        logged_read_error = None

    def status_or_404(request: Request, name: str) -> TargetStatus:
        status = poller_of(request).status(name)
        if status is None:
            raise HTTPException(404, f"target {name!r} not found")
        return status

    @app.get("/healthz", response_model=HealthModel, responses={503: {"model": HealthModel}})
    def healthz(request: Request) -> Any:
        """Report 200 while the poller starts or runs (or none is configured), 503 once it died."""
        runner = runner_of(request)
        poller = poller_of(request)
        if runner is None:
            return HealthModel(status="ok", poller="disabled")
        if runner.alive and poller.store_error is None:
            return HealthModel(status="ok", poller=str(runner.state))
        reason = config.redact(runner.error or poller.store_error or f"the poller is {runner.state}")
        body = HealthModel(status="unhealthy", poller=str(runner.state), reason=reason)
        return JSONResponse(body.model_dump(), status_code=503)

    @app.get("/api/targets", response_model=list[TargetModel])
    def list_targets(request: Request) -> list[dict[str, Any]]:
        """List every configured target and job with its state and last result."""
        poller = fresh_poller(request)
        return [_target_json(poller, status) for status in poller.statuses()]

    @app.get("/api/targets/{name}", response_model=TargetModel, responses=_NOT_FOUND)
    def get_target(request: Request, name: TargetName) -> dict[str, Any]:
        """Show one target or job: state, last result, counters and next run."""
        poller = fresh_poller(request)
        return _target_json(poller, status_or_404(request, name))

    @app.get("/api/targets/{name}/results", response_model=list[ResultModel], responses=_NOT_FOUND)
    def list_results(
        request: Request,
        name: TargetName,
        limit: Annotated[int, Query(ge=1, le=MAX_RESULTS_LIMIT, description="How many results.")] = 100,
    ) -> list[dict[str, Any]]:
        """List the target's stored results, newest first."""
        status_or_404(request, name)
        poller = poller_of(request)
        assert poller.store is not None
        with store_errors_as_503():
            return poller.store.results(name, limit)

    @app.post("/api/targets/{name}/poll", response_model=ResultModel, responses=_NOT_FOUND)
    async def poll_target(request: Request, name: TargetName) -> dict[str, Any]:
        """Poll the target (or run the job) now, store the result and return it."""
        status_or_404(request, name)
        poller = poller_of(request)
        target = poller.target(name)
        assert target is not None
        if serves_from_store(request):
            # Build on the latest stored state, which the polling process wrote.
            # NOTE: the polling process keeps its own state in memory, so its
            # next scheduled poll neither sees this result nor counts it
            # towards the thresholds.
            await asyncio.to_thread(poller.restore)
        task = asyncio.ensure_future(poller.check(target, request.app.state.resources))
        polls = manual_polls(request.app)
        polls.add(task)
        task.add_done_callback(polls.discard)
        try:
            result = await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                # Server.shutdown cancelled the poll, not the client or uvicorn.
                return JSONResponse(
                    {"detail": "the server is shutting down; the poll was cancelled"},
                    status_code=503,
                )
            raise
        return result.to_dict()

    @app.get("/", response_class=HTMLResponse)
    def status_page(request: Request) -> str:
        """Show every target's state as an HTML page that reloads itself."""
        from bgapi.page import render_status_page

        runner = runner_of(request)
        poller = fresh_poller(request)
        stats = poller.stats.snapshot()
        summary = f"{stats['runs']} run(s), {stats['missed']} missed slot(s)."
        return render_status_page(poller.statuses(), runner.mode if runner else None, summary)

    @app.get("/metrics", response_class=Response)
    def metrics(request: Request) -> Response:
        """Expose target states, response times and poller lateness to Prometheus."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        fresh_poller(request)  # the registry reads the poller's statuses
        registry = request.app.state.metrics
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/poller", response_model=PollerModel)
    def poller_stats(request: Request) -> dict[str, Any]:
        """Show the strategy, its uptime, runs, missed slots and lateness percentiles."""
        poller = poller_of(request)
        runner = runner_of(request)
        stats = poller.stats.snapshot()
        return {
            **stats,
            "mode": runner.mode if runner else None,
            "state": str(runner.state) if runner else "disabled",
            "targets": len(poller.enabled_targets),
            "first_run_at": _iso(poller.stats.first_run_at),
            "error": _redact_optional(config, (runner.error if runner else None) or poller.store_error),
            # Runs, missed slots and lateness count this process's polls only:
            # on a standby worker they stay at zero.
            "polling": runner.polling if runner else False,
            "worker_pid": os.getpid(),
            "poller_pid": runner.poller_pid if runner else None,
        }


def _target_json(poller: Poller, status: TargetStatus) -> dict[str, Any]:
    target = poller.target(status.name)
    assert target is not None
    url: str | None = None
    method: str | None = None
    if not isinstance(target, Job):
        url, method = poller.config.redact(target.url), target.method
    return {
        "name": status.name,
        "kind": "job" if isinstance(target, Job) else "http",
        "url": url,
        "method": method,
        "enabled": target.enabled,
        "interval_s": target.interval_s,
        "timeout_s": target.timeout_s,
        "state": str(status.state),
        "last_result": status.last_result.to_dict() if status.last_result else None,
        "consecutive_successes": status.consecutive_successes,
        "consecutive_failures": status.consecutive_failures,
        "last_success_at": _iso(status.last_success_at),
        "last_change_at": _iso(status.last_change_at),
        "next_run_at": _iso(status.next_run_at),
        "runs": status.runs,
        "missed": status.missed,
    }


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else format_timestamp(timestamp)


def _redact_optional(config: Config, text: str | None) -> str | None:
    return None if text is None else config.redact(text)


def manual_polls(app: Any) -> set[asyncio.Task[Any]]:
    """Return the set of polls on request now running in ``app``, creating it if needed."""
    polls: set[asyncio.Task[Any]] | None = getattr(app.state, "manual_polls", None)
    if polls is None:
        polls = app.state.manual_polls = set()
    return polls


class Server(uvicorn.Server):
    """A uvicorn server that ends with exit code 0 on SIGINT and SIGTERM."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Cancel polls on request first, then shut down as uvicorn does.

        A poll on request may wait for its target's whole timeout; without this,
        uvicorn would wait for it up to its graceful timeout and then cancel the
        request with a traceback.
        """
        app = self.config.app
        if isinstance(app, FastAPI):
            for task in list(manual_polls(app)):
                task.cancel()
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Start the shutdown on the first signal and log further ones.

        uvicorn takes a second Ctrl-C as "force quit", which skips the
        lifespan shutdown and leaves the poller thread running. bgapi's
        shutdown is bounded (about a second), so it always runs to the end.
        """
        if self.should_exit:
            logger.info("already shutting down (signal %d); this takes about a second", sig)
            return
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the signal once it has shut down, which ends the
        # process with -15 (SIGTERM) or a KeyboardInterrupt traceback (SIGINT).
        # bgapi's own shutdown is complete by then, so a signal is a normal
        # stop. The handlers stay installed until the process exits, so that
        # another Ctrl-C during the last steps cannot raise KeyboardInterrupt.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle_exit)
        yield


def uvicorn_config(
    app: Any, *, host: str, port: int, log_level: str, access_log: bool, **options: Any
) -> uvicorn.Config:
    """Return the uvicorn settings of every bgapi server, one process or several.

    ``options`` adds uvicorn settings, such as ``factory`` and ``workers``.
    """
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        # bgapi's own logging setup (bgapi.logs) handles uvicorn's loggers too.
        log_config=None,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        # Connections still open at shutdown get this long before they are cut.
        timeout_graceful_shutdown=1,
        **options,
    )


def run_server(
    app: FastAPI, *, host: str, port: int, log_level: str = "info", access_log: bool = False
) -> bool:
    """Serve ``app`` until SIGINT or SIGTERM; return False if it never started."""
    app.state.listen_host = host
    config = uvicorn_config(
        app, host=host, port=port, log_level=log_level, access_log=access_log
    )
    server = Server(config)
    try:
        server.run()
    except SystemExit:
        # uvicorn calls sys.exit(3) when it cannot bind or the lifespan startup
        # fails, after logging why; the CLI turns a failed start into exit code 1.
        return False
    # What is left only waits for the exit. Frozen, it is skipped by the
    # interpreter's last collection: with 10,000 targets, SIGTERM to exit
    # took 0.26 to 0.47 s without this and 0.21 to 0.27 s with it.
    gc.freeze()
    return server.started
