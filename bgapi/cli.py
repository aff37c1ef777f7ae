"""The ``bgapi`` command line: serve, poll-once, run-all, check-config and compare.

Only this module turns errors into exit codes: 0 for success, 1 when a
target is down (``poll-once``) or the server failed, 2 for a bad
configuration or usage.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from bgapi.config import Config
    from bgapi.state import TargetStatus

__all__ = ["app", "main"]

logger = logging.getLogger("bgapi")

app = typer.Typer(
    name="bgapi",
    help="Poll HTTP APIs in the background of a FastAPI server and act on what they return.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Mode(str, enum.Enum):
    """Execution strategies of the poller."""

    thread = "thread"
    asyncio = "asyncio"
    apscheduler = "apscheduler"
    process = "process"


class HttpClient(str, enum.Enum):
    """Transports under ``httpx.AsyncClient``, as in ``[poller] http_client``."""

    auto = "auto"
    httpx = "httpx"
    aiohttp = "aiohttp"


class LogLevel(str, enum.Enum):
    """Log levels, most severe first."""

    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"


ConfigOption = Annotated[
    Path,
    typer.Option(
        "--config",
        "-c",
        help="TOML configuration file.",
        envvar="BGAPI_CONFIG",
        dir_okay=False,
    ),
]
HostOption = Annotated[
    Optional[str],  # noqa: UP007 - typer needs Optional here on some versions
    typer.Option(help="Address the API listens on. Default: server.host from the config (127.0.0.1)."),
]
PortOption = Annotated[
    Optional[int],  # noqa: UP007
    typer.Option(min=0, max=65535, help="TCP port the API listens on. Default: server.port from the config (8000)."),
]
LogLevelOption = Annotated[
    LogLevel, typer.Option("--log-level", help="Lowest level of log messages to show.")
]
AccessLogOption = Annotated[
    bool, typer.Option("--access-log/--no-access-log", help="Log every API request.")
]


def main() -> None:
    """Run the command-line interface."""
    app()


def _load(path: Path) -> Config:
    from bgapi.config import load_config
    from bgapi.errors import ConfigError

    try:
        return load_config(path)
    except ConfigError as exc:
        _exit_config_error(exc)


def _exit_config_error(exc: Exception) -> typer.Exit:
    from rich.console import Console

    # soft_wrap: one problem stays on one line at any terminal width, so
    # grep and CI logs see it whole.
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    problems = getattr(exc, "problems", [str(exc)])
    console.print(f"[bold red]error:[/] invalid configuration ({len(problems)} problem(s)):")
    for problem in problems:
        console.print(f"  {problem}", markup=False)
    raise typer.Exit(2)


@app.command("check-config")
def check_config(
    file: Annotated[
        Optional[Path],  # noqa: UP007
        typer.Argument(help="TOML configuration file; the same as --config.", dir_okay=False),
    ] = None,
    config: ConfigOption = Path("config.toml"),
) -> None:
    """Validate a configuration file without starting anything."""
    config = file or config
    loaded = _load(config)
    typer.echo(f"{config}: OK, {len(loaded.targets)} target(s), {len(loaded.enabled_targets)} enabled")
    for warning in loaded.startup_warnings():
        typer.echo(f"warning: {warning}", err=True)


@app.command("run-all")
def run_all(
    config: ConfigOption = Path("config.toml"),
    mode: Annotated[
        Optional[Mode],  # noqa: UP007
        typer.Option(help="Where the poller runs. Default: poller.mode from the config (thread)."),
    ] = None,
    host: HostOption = None,
    port: PortOption = None,
    log_level: LogLevelOption = LogLevel.info,
    access_log: AccessLogOption = False,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes that serve the API; exactly one of them polls, "
            "and another takes over if it dies.",
        ),
    ] = 1,
) -> None:
    """Serve the API and run the poller beside it until SIGINT or SIGTERM."""
    loaded = _load(config)
    chosen = mode.value if mode else loaded.poller.mode
    _check_mode_available(chosen)
    _serve(
        loaded,
        chosen,
        poll=True,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        workers=workers,
        config_path=config,
    )


@app.command("serve")
def serve(
    config: ConfigOption = Path("config.toml"),
    host: HostOption = None,
    port: PortOption = None,
    log_level: LogLevelOption = LogLevel.info,
    access_log: AccessLogOption = False,
) -> None:
    """Serve the API without a schedule: stored results, and polls on request."""
    loaded = _load(config)
    _serve(loaded, None, poll=False, host=host, port=port, log_level=log_level, access_log=access_log)


@app.command("poll-once")
def poll_once(
    config: ConfigOption = Path("config.toml"),
    target: Annotated[
        Optional[str],  # noqa: UP007
        typer.Option(help="Poll only the target with this name."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    log_level: LogLevelOption = LogLevel.warning,
) -> None:
    """Poll every enabled target (or one) once, store and print the results.

    Exits 0 when every polled target is up, 1 when any is down or unknown, and 2
    when the configuration or the --target name is invalid.
    """
    from bgapi.logs import setup_logging
    from bgapi.oneshot import poll_all, print_json, print_table

    loaded = _load(config)
    setup_logging(log_level.value, loaded.redact)
    if target is not None and loaded.target(target) is None:
        names = ", ".join(t.name for t in loaded.targets) or "none"
        typer.echo(f"error: no target named {target!r} in {config}; targets: {names}", err=True)
        raise typer.Exit(2)
    if target is None and not loaded.enabled_targets:
        # Nothing polled means nothing is known to be up: a cron check must not pass.
        typer.echo(f"error: {config} has no enabled target; enable one or pass --target NAME", err=True)
        raise typer.Exit(1)
    statuses = _run_or_exit(lambda: poll_all(loaded, target, progress=not as_json))
    if as_json:
        print_json(loaded, statuses)
    else:
        print_table(statuses)
    raise typer.Exit(0 if statuses and all(s.state == "up" for s in statuses) else 1)


@app.command("compare")
def compare(
    modes: Annotated[
        str,
        typer.Option(
            help="Comma-separated modes to measure: thread, asyncio, apscheduler, process, "
            "and the peers fixed-delay, bare-thread, bare-asyncio."
        ),
    ] = "thread,asyncio",
    targets: Annotated[int, typer.Option(min=1, help="Number of generated targets.")] = 50,
    interval: Annotated[float, typer.Option(min=0.001, help="Poll interval of every target, in seconds.")] = 1.0,
    duration: Annotated[float, typer.Option(min=0.5, help="Measured time of each run, in seconds.")] = 10.0,
    load: Annotated[int, typer.Option(min=0, help="Concurrent API clients during each run (0: none).")] = 0,
    rate: Annotated[
        str,
        typer.Option(
            metavar="<req/s|N%>",
            help="Total API requests per second of the --load clients: 0 for as fast as they can, "
            "or at least 1. Or a share of the server's capacity, above 0% and at most 100%, e.g. 50%: "
            "one extra run without a poller measures the capacity first.",
        ),
    ] = "0",
    warmup: Annotated[
        Optional[float],  # noqa: UP007
        typer.Option(min=0, help="Seconds from server start to the measured window (default: interval + 0.5, at most 10.5)."),
    ] = None,
    blocking_ms: Annotated[
        float, typer.Option(min=0, help="Milliseconds every poll blocks its thread, as a blocking call would.")
    ] = 0.0,
    repeat: Annotated[int, typer.Option(min=1, help="Repetitions of each mode, interleaved.")] = 3,
    http_client: Annotated[
        HttpClient,
        typer.Option(
            help="Transport under httpx in the measured server, like http_client in the "
            "config's poller table."
        ),
    ] = HttpClient.auto,
    baseline: Annotated[
        bool, typer.Option("--baseline/--no-baseline", help="Also run the server without a poller, for the ratios.")
    ] = True,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write every raw figure to this JSON file.")] = None,  # noqa: UP007
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of the distributions (needs bgapi\\[plot]).")] = None,  # noqa: UP007
) -> None:
    """Measure the strategies side by side against a built-in local upstream."""
    from bgapi.compare import run_compare

    code = run_compare(
        modes=[m.strip() for m in modes.split(",") if m.strip()],
        targets=targets,
        interval=interval,
        duration=duration,
        load=load,
        blocking_ms=blocking_ms,
        repeat=repeat,
        json_path=json_path,
        plot_path=plot,
        rate=rate,
        warmup=warmup,
        http_client=http_client.value,
        baseline=baseline,
    )
    raise typer.Exit(code)


def _check_mode_available(mode: str) -> None:
    if mode != "apscheduler":
        return
    try:
        import apscheduler  # noqa: F401
    except ImportError:
        typer.echo(
            "error: mode 'apscheduler' needs APScheduler 3; install it with: "
            "pip install 'bgapi[apscheduler]'",
            err=True,
        )
        raise typer.Exit(2) from None


def _run_or_exit(function: Callable[[], list[TargetStatus]]) -> list[TargetStatus]:
    from bgapi.errors import BgapiError

    try:
        return function()
    except BgapiError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _check_store(config: Config) -> None:
    """Exit 1 with one line if the store cannot be opened for writing.

    The server's startup opens it again; a failure there would print
    uvicorn's traceback instead of this message.
    """
    from bgapi.errors import StoreError
    from bgapi.store import Store

    store = Store(config.store.path, config.store.retention)
    try:
        store.open()
    except StoreError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    store.close()


def _serve(
    config: Config,
    mode: str | None,
    *,
    poll: bool,
    host: str | None,
    port: int | None,
    log_level: LogLevel,
    access_log: bool,
    workers: int = 1,
    config_path: Path | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM; several workers re-read the file at ``config_path``."""
    from bgapi.logs import setup_logging

    setup_logging(log_level.value, config.redact)
    _check_store(config)
    host = host or config.server.host
    port = config.server.port if port is None else port
    if workers > 1:
        from bgapi.workers import run_workers

        assert config_path is not None, "worker processes load the config from its file"
        started = run_workers(
            config_path,
            workers=workers,
            mode=mode,
            host=host,
            port=port,
            log_level=log_level.value,
            access_log=access_log,
        )
    else:
        from bgapi.server import create_app, run_server

        web_app = create_app(config, mode=mode, poll=poll)
        started = run_server(
            web_app, host=host, port=port, log_level=log_level.value, access_log=access_log
        )
    if not started:
        raise typer.Exit(1)
    logger.info("bgapi stopped")
