"""The ``bgapi`` command line as a subprocess: run-all shutdown, poll-once, help."""

from __future__ import annotations

import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import ConfigWriter, ProcessOutcome, assert_clean_exit, run_bgapi, run_cli
from upstream import Upstream

# Generous for a loaded machine; the documented bound is 2 s.
STOP_BOUND_S = 2.0
WIDE = {"COLUMNS": "200"}


def _assert_clean_stop(outcome: ProcessOutcome) -> None:
    assert_clean_exit(outcome)
    assert outcome.elapsed_s < STOP_BOUND_S, f"took {outcome.elapsed_s:.2f} s:\n{outcome.output}"
    assert "poller stopped after" in outcome.output


# run-all -----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
@pytest.mark.parametrize("mode", ["thread", "asyncio", "process"])
def test_run_all_polls_and_stops(
    make_config: ConfigWriter, upstream: Upstream, mode: str, sig: signal.Signals
) -> None:
    config = make_config(
        targets=[
            {"name": "up", "url": upstream.url("/ok"), "interval": 0.2},
            {"name": "down", "url": upstream.url("/status/500"), "interval": 0.2},
        ]
    )

    with run_bgapi(config, "--mode", mode) as bgapi:
        targets = bgapi.wait_for(
            lambda docs: [d["state"] for d in docs] == ["up", "down"], "/api/targets"
        )
        poller = bgapi.get("/api/poller").json()
        outcome = bgapi.stop(sig)

    assert targets[0]["last_result"]["status_code"] == 200
    assert targets[1]["last_result"]["status_code"] == 500
    assert poller["mode"] == mode
    assert poller["runs"] >= 2
    _assert_clean_stop(outcome)
    assert f"poller started in {mode} mode with 2 target(s)" in outcome.output
    assert "target down changed from unknown to down" in outcome.output
    assert config.parent.joinpath("bgapi.db").exists()


@pytest.mark.parametrize("mode", ["thread", "asyncio", "process"])
def test_run_all_stops_during_long_interval(
    make_config: ConfigWriter, upstream: Upstream, mode: str
) -> None:
    config = make_config(targets=[{"name": "hourly", "url": upstream.url("/ok"), "interval": 60}])

    with run_bgapi(config, "--mode", mode) as bgapi:
        bgapi.wait_for(lambda doc: doc["state"] == "up", "/api/targets/hourly")
        outcome = bgapi.stop(signal.SIGTERM)

    _assert_clean_stop(outcome)
    assert upstream.hits["/ok"] == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
@pytest.mark.parametrize("mode", ["thread", "asyncio", "process"])
def test_run_all_stops_with_poll_in_flight(
    make_config: ConfigWriter, upstream: Upstream, mode: str, sig: signal.Signals
) -> None:
    config = make_config(
        targets=[{"name": "stuck", "url": upstream.url("/hang"), "interval": 60, "timeout": 30}]
    )

    with run_bgapi(config, "--mode", mode) as bgapi:
        assert upstream.wait_for_hits("/hang", 1, timeout=10), bgapi.output()
        health = bgapi.get("/healthz")
        outcome = bgapi.stop(sig)

    assert health.status_code == 200
    _assert_clean_stop(outcome)


def test_run_all_config_error_exits_2(make_config: ConfigWriter) -> None:
    config = make_config("[poller]\ninterval = 0\n")

    completed = run_cli("run-all", "--config", config, cwd=config.parent)

    assert completed.returncode == 2
    assert "poller.interval: must be at least 0.001" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_run_all_port_in_use_exits_1(make_config: ConfigWriter, upstream: Upstream) -> None:
    config = make_config(targets=[{"name": "t", "url": upstream.url("/ok"), "interval": 60}])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        completed = run_cli("run-all", "--config", config, "--port", str(port), cwd=config.parent)

    assert completed.returncode == 1, completed.stderr
    assert "address already in use" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert "poller stopped" in completed.stderr


def test_serve_polls_only_on_request(make_config: ConfigWriter, upstream: Upstream) -> None:
    config = make_config(targets=[{"name": "t", "url": upstream.url("/ok"), "interval": 0.05}])

    with run_bgapi(config, command="serve") as bgapi:
        health = bgapi.get("/healthz").json()
        polled = bgapi.client.post("/api/targets/t/poll").json()
        outcome = bgapi.stop(signal.SIGTERM)

    assert health["poller"] == "disabled"
    assert polled["ok"] is True
    assert upstream.hits["/ok"] == 1
    assert outcome.returncode == 0
    assert "Traceback" not in outcome.output


# poll-once ---------------------------------------------------------------------------


def _poll_once(config: Path, *args: str) -> tuple[int, str, str]:
    completed = run_cli("poll-once", "--config", config, *args, cwd=config.parent, env=WIDE)
    assert "Traceback" not in completed.stderr
    return completed.returncode, completed.stdout, completed.stderr


def _targets(upstream: Upstream, *paths: str, **fields: Any) -> list[dict[str, Any]]:
    return [
        {"name": path.strip("/").replace("/", "-"), "url": upstream.url(path), **fields}
        for path in paths
    ]


def test_poll_once_all_up(make_config: ConfigWriter, upstream: Upstream) -> None:
    config = make_config(targets=_targets(upstream, "/ok", "/json"))

    code, stdout, stderr = _poll_once(config)

    assert code == 0, stderr
    assert "ok" in stdout
    assert "json" in stdout
    assert stdout.count("up") >= 2
    assert upstream.hits["/ok"] == 1
    assert upstream.hits["/json"] == 1


def test_poll_once_one_down(make_config: ConfigWriter, upstream: Upstream) -> None:
    config = make_config(targets=_targets(upstream, "/ok", "/status/500"))

    code, stdout, _ = _poll_once(config)

    assert code == 1
    assert "down" in stdout
    assert "500" in stdout


def test_poll_once_unknown_exits_1(make_config: ConfigWriter, upstream: Upstream) -> None:
    config = make_config(targets=_targets(upstream, "/status/500", failure_threshold=2))

    first, first_out, _ = _poll_once(config, "--json")
    second, second_out, _ = _poll_once(config, "--json")

    # The first failure leaves it unknown; the stored count makes the second one down.
    assert first == 1
    assert json.loads(first_out)[0]["state"] == "unknown"
    assert second == 1
    assert json.loads(second_out)[0]["state"] == "down"


def test_poll_once_config_error(make_config: ConfigWriter) -> None:
    config = make_config(_targets_toml_with_bad_interval())

    code, _, stderr = _poll_once(config)

    assert code == 2
    assert "interval" in stderr


def _targets_toml_with_bad_interval() -> str:
    return '[[targets]]\nname = "a"\nurl = "http://127.0.0.1:9/"\ninterval = -1\n'


def test_poll_once_json(make_config: ConfigWriter, upstream: Upstream) -> None:
    config = make_config(targets=_targets(upstream, "/ok", "/status/503"))

    code, stdout, _ = _poll_once(config, "--json")
    documents = json.loads(stdout)

    assert code == 1
    assert isinstance(documents, list)
    assert [d["name"] for d in documents] == ["ok", "status-503"]
    assert [d["state"] for d in documents] == ["up", "down"]
    for document in documents:
        assert {"name", "state", "last_result"} <= set(document)
        result = document["last_result"]
        assert {
            "ok",
            "status_code",
            "elapsed_ms",
            "error_kind",
            "error",
            "failed_conditions",
        } <= set(result)
        assert {"scheduled_at", "started_at"} <= set(result)
    assert documents[1]["last_result"]["error_kind"] == "http_status"
    assert documents[0]["last_result"]["error_kind"] is None


def test_poll_once_one_target(make_config: ConfigWriter, upstream: Upstream) -> None:
    config = make_config(targets=_targets(upstream, "/ok", "/json", "/status/500"))

    code, stdout, _ = _poll_once(config, "--target", "json", "--json")

    assert code == 0
    assert [d["name"] for d in json.loads(stdout)] == ["json"]
    assert upstream.hits["/json"] == 1
    assert upstream.hits["/ok"] == 0
    assert upstream.hits["/status/500"] == 0


def test_poll_once_unknown_target(make_config: ConfigWriter, upstream: Upstream) -> None:
    config = make_config(targets=_targets(upstream, "/ok"))

    code, _, stderr = _poll_once(config, "--target", "nope")

    assert code == 2
    assert "no target named 'nope'" in stderr
    assert "ok" in stderr, "the message lists the configured targets"
    assert upstream.hits["/ok"] == 0


def test_poll_once_stores_results(make_config: ConfigWriter, upstream: Upstream) -> None:
    import sqlite3

    config = make_config(targets=_targets(upstream, "/ok"))

    _poll_once(config)
    _poll_once(config)
    with sqlite3.connect(config.parent / "bgapi.db") as connection:
        count = connection.execute("SELECT count(*) FROM results").fetchone()[0]

    assert count == 2


def test_poll_once_hides_secret(make_config: ConfigWriter, upstream: Upstream) -> None:
    secret = "tok-" + "5d" * 8
    config = make_config(
        targets=[
            {
                "name": "s",
                "url": upstream.url("/status/401") + "?token=${TOKEN}",
                "headers": {"Authorization": "Bearer ${TOKEN}"},
            }
        ]
    )

    completed = run_cli(
        "poll-once", "--config", config, "--json", cwd=config.parent, env={"TOKEN": secret}
    )

    assert completed.returncode == 1
    assert secret not in completed.stdout + completed.stderr
    assert json.loads(completed.stdout)[0]["url"].endswith("token=***")


# help --------------------------------------------------------------------------------

COMMANDS = ["run-all", "serve", "poll-once", "check-config", "compare"]


def test_python_m_help(tmp_path: Path) -> None:
    completed = run_cli("--help", cwd=tmp_path, env=WIDE)

    assert completed.returncode == 0
    for command in COMMANDS:
        assert command in completed.stdout


def test_console_script_help(tmp_path: Path) -> None:
    import subprocess

    script = Path(sys.executable).parent / "bgapi"
    completed = subprocess.run(
        [str(script), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"COLUMNS": "200", "PATH": str(script.parent)},
    )

    assert completed.returncode == 0, completed.stderr
    assert "run-all" in completed.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_units(tmp_path: Path, command: str) -> None:
    completed = run_cli(command, "--help", cwd=tmp_path, env=WIDE)
    text = " ".join(completed.stdout.split())

    assert completed.returncode == 0
    assert "Usage:" in text
    for line in completed.stdout.splitlines():
        lowered = line.lower()
        if any(word in lowered for word in ("--interval", "--duration", "--timeout", "--blocking")):
            assert "second" in lowered, f"no unit in: {line.strip()}"


def test_run_all_help_options(tmp_path: Path) -> None:
    completed = run_cli("run-all", "--help", cwd=tmp_path, env=WIDE)

    for option in ("--config", "--mode", "--host", "--port", "--log-level"):
        assert option in completed.stdout
    assert "thread" in completed.stdout
    assert "asyncio" in completed.stdout


def test_run_all_logs_hide_secret(make_config: ConfigWriter, upstream: Upstream) -> None:
    secret = "tok-" + "3c" * 8
    config = make_config(
        targets=[
            {
                "name": "s",
                "url": upstream.url("/status/401") + "?token=${TOKEN}",
                "headers": {"Authorization": "Bearer ${TOKEN}"},
                "conditions": ['body contains "${TOKEN}"'],
                "interval": 0.1,
                "actions": [{"type": "log", "on": "always"}],
            }
        ]
    )

    with run_bgapi(config, "--log-level", "debug", "--access-log", env={"TOKEN": secret}) as bgapi:
        bgapi.wait_for(lambda doc: doc["state"] == "down", "/api/targets/s")
        bgapi.client.post("/api/targets/s/poll")
        outcome = bgapi.stop(signal.SIGTERM)

    _assert_clean_stop(outcome)
    assert "target s is down" in outcome.output
    assert secret not in outcome.output


def test_poll_once_store_error_exits_1(make_config: ConfigWriter, upstream: Upstream) -> None:
    config = make_config(
        store={"path": "/nonexistent-bgapi-dir/results.db"},
        targets=_targets(upstream, "/ok"),
    )

    code, _, stderr = _poll_once(config)

    assert code == 1
    assert "cannot open the store '/nonexistent-bgapi-dir/results.db'" in stderr
    assert "[store] path" in stderr
