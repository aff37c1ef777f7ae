"""Shared test helpers: TOML builders, the CLI as a subprocess and an in-thread server.

Every helper here runs real components: ``bgapi`` itself through
``sys.executable -m bgapi`` and the API through uvicorn on 127.0.0.1. Each wait
is bounded, so a broken build fails a test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

__all__ = [
    "ConfigWriter",
    "ProcessOutcome",
    "RunningBgapi",
    "free_port",
    "render_config",
    "run_bgapi",
    "run_cli",
    "serve_in_thread",
    "wait_until",
]

STARTUP_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
CLI_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 5.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.02) -> bool:
    """Call ``predicate`` until it returns True or ``timeout_s`` seconds pass."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()


# TOML ------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        pairs = ", ".join(
            f"{json.dumps(str(key))} = {_toml_value(item)}" for key, item in value.items()
        )
        return "{" + pairs + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML: {value!r}")


def _table(header: str, values: Mapping[str, Any]) -> list[str]:
    lines = [header]
    lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
    return lines


def render_config(
    *,
    targets: list[Mapping[str, Any]] = (),  # type: ignore[assignment]
    server: Mapping[str, Any] | None = None,
    poller: Mapping[str, Any] | None = None,
    store: Mapping[str, Any] | None = None,
) -> str:
    """Render a bgapi configuration as TOML text.

    Each target is a mapping of its keys; an ``actions`` entry is a list of
    mappings that become ``[[targets.actions]]`` tables.
    """
    lines: list[str] = []
    for header, section in (("[server]", server), ("[poller]", poller), ("[store]", store)):
        if section:
            lines += _table(header, section) + [""]
    for target in targets:
        fields = {key: value for key, value in target.items() if key != "actions"}
        lines += _table("[[targets]]", fields)
        for action in target.get("actions", []):
            lines += _table("[[targets.actions]]", action)
        lines.append("")
    return "\n".join(lines)


class ConfigWriter:
    """Write configuration files into one test's temporary directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.store_path = directory / "bgapi.db"
        self._count = 0

    def __call__(self, text: str | None = None, name: str | None = None, **sections: Any) -> Path:
        """Write ``text``, or :func:`render_config` of ``sections``, and return the path.

        Rendered configs store results in ``<tmp_path>/bgapi.db`` unless
        the ``store`` section sets another path.
        """
        if text is None:
            sections.setdefault("store", {"path": self.store_path})
            text = render_config(**sections)
        self._count += 1
        path = self.directory / (name or f"config{self._count}.toml")
        path.write_text(text, encoding="utf-8")
        return path


# The CLI as a subprocess -------------------------------------------------------------


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment for a ``bgapi`` subprocess: no stray config, unbuffered."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("BGAPI_")}
    env.pop("COLUMNS", None)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def run_cli(
    *args: str | os.PathLike[str],
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout_s: float = CLI_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bgapi ARGS`` to completion and capture stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "bgapi", *map(str, args)],
        cwd=cwd,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@dataclass(frozen=True)
class ProcessOutcome:
    """How a ``bgapi`` process ended after a signal."""

    returncode: int
    elapsed_s: float
    output: str


def assert_clean_exit(outcome: ProcessOutcome) -> None:
    """Check that bgapi exited with code 0, without a traceback or an asyncio warning."""
    assert outcome.returncode == 0, outcome.output
    assert "Traceback" not in outcome.output
    assert "Task was destroyed but it is pending" not in outcome.output
    assert "bgapi stopped" in outcome.output


class RunningBgapi:
    """A ``bgapi`` subprocess serving the API on ``base_url``."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.client = httpx.Client(base_url=self.base_url, timeout=HTTP_TIMEOUT_S)
        self.outcome: ProcessOutcome | None = None

    def output(self) -> str:
        """Return what the process has written to stdout and stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        """Send a GET request to the API."""
        return self.client.get(path, **kwargs)

    def wait_healthy(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Wait until ``/healthz`` returns 200.

        Raises:
            AssertionError: the process exited or did not become healthy in time,
                with its output in the message.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"bgapi exited with {self.process.returncode} before serving:\n{self.output()}"
                )
            with contextlib.suppress(httpx.TransportError):
                if self.get("/healthz").status_code == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"bgapi was not healthy within {timeout_s} s:\n{self.output()}")

    def wait_for(self, predicate: Callable[[Any], bool], path: str, timeout_s: float = 10.0) -> Any:
        """Poll ``GET path`` until ``predicate(json)`` holds; return that JSON.

        Raises:
            AssertionError: the condition did not hold in time.
        """
        deadline = time.monotonic() + timeout_s
        document: Any = None
        while time.monotonic() < deadline:
            response = self.get(path)
            if response.status_code == 200:
                document = response.json()
                if predicate(document):
                    return document
            time.sleep(0.05)
        raise AssertionError(f"GET {path} never matched; last: {document!r}\n{self.output()}")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> ProcessOutcome:
        """Send ``sig`` and wait for the exit; return the code, elapsed time and output."""
        self.client.close()
        start = time.monotonic()
        self.process.send_signal(sig)
        try:
            returncode = self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            returncode = self.process.wait(STOP_TIMEOUT_S)
        self.outcome = ProcessOutcome(returncode, time.monotonic() - start, self.output())
        return self.outcome


@contextlib.contextmanager
def run_bgapi(
    config: Path,
    *args: str,
    command: str = "run-all",
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    wait: bool = True,
) -> Iterator[RunningBgapi]:
    """Start ``bgapi COMMAND --config CONFIG --port PORT ARGS`` and wait for ``/healthz``.

    The working directory is the config's directory. On exit the process gets
    SIGTERM if the test did not stop it, and SIGKILL if that does not end it.
    """
    port = port or free_port()
    log_path = config.with_suffix(f".{port}.log")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bgapi",
                command,
                "--config",
                str(config),
                "--port",
                str(port),
                *args,
            ],
            cwd=config.parent,
            env=cli_env(env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    running = RunningBgapi(process, port, log_path)
    try:
        if wait:
            running.wait_healthy()
        yield running
    finally:
        if process.poll() is None:
            running.stop(signal.SIGTERM)
        running.client.close()


def interrupt_during_startup(config: Path, *args: str, after_line: str, delay_s: float) -> ProcessOutcome:
    """Start ``bgapi run-all`` in a process group of its own, and Ctrl-C it during startup.

    SIGINT goes to the whole group, as a terminal sends it, ``delay_s``
    seconds after the output shows ``after_line``. The processes that bgapi
    is starting then are still importing their modules.
    """
    log_path = config.with_suffix(".interrupted.log")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bgapi", "run-all", "--config", str(config), "--port", str(free_port()), *args],
            cwd=config.parent,
            env=cli_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        logged = wait_until(lambda: after_line in log_path.read_text(errors="replace"), STARTUP_TIMEOUT_S, 0.005)
        assert logged, f"{after_line!r} never appeared:\n{log_path.read_text(errors='replace')}"
        time.sleep(delay_s)
        start = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)
        returncode = process.wait(STOP_TIMEOUT_S)
        return ProcessOutcome(returncode, time.monotonic() - start, log_path.read_text(errors="replace"))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT_S)


# The app in a thread ---------------------------------------------------------------


@contextlib.contextmanager
def serve_in_thread(app: Any, log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` with :class:`bgapi.server.Server` in a thread; yield its base URL.

    The socket is bound before the server starts, so there is no port race.
    Leaving the context runs the app's lifespan shutdown and joins the thread.
    """
    import uvicorn

    from bgapi.server import Server

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, log_level=log_level, lifespan="on")
    server = Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True
    )
    thread.start()
    try:
        if not wait_until(lambda: server.started or not thread.is_alive(), STARTUP_TIMEOUT_S):
            raise AssertionError(f"uvicorn did not start within {STARTUP_TIMEOUT_S} s")
        if not server.started:
            raise AssertionError("uvicorn exited during startup; see the log")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(STOP_TIMEOUT_S)
        sock.close()
        if thread.is_alive():
            raise AssertionError(f"uvicorn did not stop within {STOP_TIMEOUT_S} s")
