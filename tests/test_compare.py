"""Tests of ``bgapi compare``: the real command end to end, and its parts on real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import run_cli

from bgapi.compare import parse_rate
from bgapi.compare.load import run_load
from bgapi.compare.report import (
    EXTRA_CPU,
    METRICS,
    RATIOS,
    markdown_table,
    share_text,
    summarize,
    verdict,
    write_plot,
)
from bgapi.compare.stats import histogram, percentiles, sign_test, spread
from bgapi.compare.upstream import BODY, serve

SMOKE_MODES = ("thread", "asyncio", "fixed-delay")
SMOKE_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """Run one tiny comparison with API load and return its JSON and its stdout."""
    workdir = tmp_path_factory.mktemp("compare")
    out = workdir / "compare.json"
    result = run_cli(
        "compare",
        "--modes", ",".join(SMOKE_MODES),
        "--targets", "5",
        "--interval", "0.1",
        "--duration", "0.6",
        "--warmup", "0.2",
        "--load", "4",
        "--rate", "200",
        "--repeat", "1",
        "--json", out,
        cwd=workdir,
        timeout_s=SMOKE_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text()), result.stdout


def test_smoke_json_describes_machine(smoke: tuple[dict, str]) -> None:
    document, _ = smoke
    machine = document["machine"]
    assert machine["cpu_count"] >= 1
    assert machine["python"].count(".") == 2
    assert "httpx" in machine["packages"]
    assert document["settings"]["modes"] == list(SMOKE_MODES)
    assert document["format_version"] == 1


def test_smoke_measures_every_run(smoke: tuple[dict, str]) -> None:
    document, _ = smoke
    runs = document["runs"]
    assert sorted(run["mode"] for run in runs) == sorted(["baseline", *SMOKE_MODES])
    for run in runs:
        assert run["ok"], run
        assert run["exit_code"] == 0, run["mode"]
        assert 0 < run["stop_s"] < 10, run["mode"]
        assert 0 < run["ready_s"] < 60, run["mode"]
        assert 10 < run["peak_rss_mb"] < 2000, run["mode"]
        assert run["cpu_s"] >= 0, run["mode"]
        server = run["server"]
        assert server["completed"] > 0, run["mode"]
        assert server["requests_per_s"] > 0, run["mode"]
        assert 0 < server["latency_ms"]["p50"] <= server["latency_ms"]["p99"] <= server["latency_ms"]["max"]


def test_smoke_poll_modes_ran_on_schedule(smoke: tuple[dict, str]) -> None:
    document, _ = smoke
    for run in document["runs"]:
        if run["mode"] == "baseline":
            assert run["runs_done"] == 0
            continue
        lateness = run["lateness_ms"]
        assert run["runs_done"] > 0, run["mode"]
        assert run["runs_scheduled"] > 0, run["mode"]
        assert run["poll_errors"] == {}, run["mode"]
        assert -1 < lateness["p50"] <= lateness["p99"] <= lateness["max"], run["mode"]
        assert 0 < run["first_poll_s"] < 60, run["mode"]
        assert run["cpu_s_per_1000_polls"] > 0, run["mode"]
        assert run["drift_ms"] is not None, run["mode"]
        assert run["runner_state"] == "stopped", run["mode"]


def test_smoke_baseline_returns_last_results(smoke: tuple[dict, str]) -> None:
    # The baseline's store is seeded with one result per target, so its API
    # returns each last result too. Only the next run and the lateness stay null.
    document, _ = smoke
    sizes = {run["mode"]: run["server"]["mean_body_bytes"] for run in document["runs"]}
    assert sizes["baseline"] > 0
    assert sizes["baseline"] == pytest.approx(sizes["thread"], rel=0.1)


def test_smoke_summary_has_every_metric(smoke: tuple[dict, str]) -> None:
    document, _ = smoke
    summary = document["summary"]
    assert set(summary) == {"baseline", *SMOKE_MODES}
    for mode, entry in summary.items():
        for key, _, _ in METRICS:
            assert set(entry[key]) == {"median", "min", "max"}, (mode, key)
        for key, _, _ in RATIOS:
            assert key in entry, (mode, key)
        assert EXTRA_CPU in entry, mode
    assert summary["baseline"]["server_p99_ratio"]["median"] == pytest.approx(1.0)
    assert summary["baseline"][EXTRA_CPU]["median"] is None
    assert summary["thread"]["server_p99_ratio"]["median"] > 0


def test_smoke_prints_table_and_verdict(smoke: tuple[dict, str]) -> None:
    document, stdout = smoke
    for mode in SMOKE_MODES:
        assert mode in stdout
    assert "run lateness p99 (ms)" in stdout
    assert document["verdict"]
    assert "baseline" in document["verdict"]


def test_smoke_runs_plot_as_png(smoke: tuple[dict, str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    document, _ = smoke
    out = tmp_path / "plot.png"
    write_plot(out, document["runs"], ["baseline", *SMOKE_MODES], "smoke")
    assert out.read_bytes().startswith(b"\x89PNG")


def test_compare_rejects_unknown_mode(tmp_path: Path) -> None:
    result = run_cli("compare", "--modes", "thread,threads", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown mode(s) 'threads'" in result.stderr
    assert "bare-thread" in result.stderr


def test_compare_rejects_rate_without_load(tmp_path: Path) -> None:
    result = run_cli("compare", "--rate", "100", cwd=tmp_path)
    assert result.returncode == 2
    assert "--rate needs --load" in result.stderr


@pytest.mark.parametrize("rate", ["150%", "0%", "-5", "fast", "nan", "inf"])
def test_compare_rejects_invalid_rate(rate: str, tmp_path: Path) -> None:
    result = run_cli("compare", "--load", "5", "--rate", rate, cwd=tmp_path)
    assert result.returncode == 2
    assert f"--rate '{rate}'" in result.stderr


@pytest.mark.parametrize("rate", ["0.5", "1e-400", "%", "50%%", "nan%"])
def test_compare_rejects_tiny_or_text_rate(rate: str, tmp_path: Path) -> None:
    result = run_cli("compare", "--load", "5", "--rate", rate, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"--rate '{rate}' is invalid" in result.stderr


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_compare_checks_output_path_first(option: str, tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "out.file"
    result = run_cli("compare", option, str(missing), cwd=tmp_path)
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    result = run_cli("compare", option, str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert "is a directory" in result.stderr


def test_parse_rate_reads_number_or_share() -> None:
    assert parse_rate("1000") == (1000.0, None)
    assert parse_rate("0") == (0.0, None)
    assert parse_rate(" 50% ") == (0.0, 0.5)
    assert parse_rate("100%") == (0.0, 1.0)
    assert parse_rate("0.01%") == (0.0, 0.0001)
    assert parse_rate("1_000") == (1000.0, None)


def test_share_text_keeps_small_shares() -> None:
    assert share_text(0.5) == "50%"
    assert share_text(0.0001) == "0.01%"
    assert share_text(0.004) == "0.4%"


def test_verdict_warns_when_rate_not_kept() -> None:
    def run(mode: str, late: int) -> dict:
        server = {"latency_ms": {"p99": 5.0}, "completed": 100, "late_sends": late, "requests_per_s": 90}
        return {"mode": mode, "repetition": 0, "ok": True, "runs_done": 10, "lateness_ms": {"p99": 1.0}, "server": server}

    summary = summarize([run("baseline", 60), run("thread", 2)], ["baseline", "thread"])
    settings = {"load": 5, "rate": 5000, "targets": 1, "interval_s": 1.0}
    text = verdict(summary, ["baseline", "thread"], settings)
    assert "did not keep up with 5000 requests/s in baseline" in text
    assert "60%" in text
    settings["rate"] = 0
    assert "did not keep up" not in verdict(summary, ["baseline", "thread"], settings)


def test_rate_share_probes_capacity_first(tmp_path: Path) -> None:
    out = tmp_path / "share.json"
    result = run_cli(
        "compare",
        "--modes", "thread",
        "--targets", "3",
        "--duration", "0.6",
        "--warmup", "0.3",
        "--load", "3",
        "--rate", "40%",
        "--repeat", "1",
        "--json", str(out),
        cwd=tmp_path,
        timeout_s=SMOKE_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    assert "capacity without a poller" in result.stderr
    settings = json.loads(out.read_text())["settings"]
    assert settings["rate_share"] == 0.4
    assert settings["capacity_requests_per_s"] > 0
    assert settings["rate"] == max(1, round(0.4 * settings["capacity_requests_per_s"]))
    assert "40% of capacity" in json.loads(out.read_text())["verdict"]


def test_plot_without_matplotlib_names_extra(tmp_path: Path) -> None:
    # A matplotlib module that fails to import simulates a missing install.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "matplotlib.py").write_text("raise ImportError('No module named matplotlib')\n")
    result = run_cli(
        "compare", "--plot", tmp_path / "out.png", cwd=tmp_path, env={"PYTHONPATH": str(shadow)}
    )
    assert result.returncode == 2
    assert "pip install 'bgapi[plot]'" in result.stderr
    assert not (tmp_path / "out.png").exists()


@pytest.fixture
def upstream_port() -> Iterator[int]:
    """Serve the built-in upstream in a thread and return its port."""
    ready = threading.Event()
    port: list[int] = []
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def on_ready(bound: int) -> None:
        port.append(bound)
        ready.set()

    async def main() -> None:
        await serve(ready=on_ready, stop=stop, max_seconds=60)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield port[0]
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)
    loop.close()


def _read_response(sock: socket.socket, buffer: bytearray) -> bytes:
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(4096)
        assert chunk, "connection closed before the response head"
        buffer += chunk
    end = buffer.index(b"\r\n\r\n") + 4
    while len(buffer) < end + len(BODY):
        buffer += sock.recv(4096)
    response = bytes(buffer[: end + len(BODY)])
    del buffer[: end + len(BODY)]
    return response


def test_upstream_keeps_connection_and_skips_bodies(upstream_port: int) -> None:
    with socket.create_connection(("127.0.0.1", upstream_port), timeout=5) as sock:
        # Two pipelined requests, the first with a body that must not be read as a request.
        sock.sendall(
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 19\r\n\r\nGET /b HTTP/1.1\r\n\r\n"
            b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        buffer = bytearray()
        first = _read_response(sock, buffer)
        second = _read_response(sock, buffer)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(4096)
    assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    assert first.endswith(BODY)
    assert second.startswith(b"HTTP/1.1 200 OK\r\n")


def test_upstream_closes_on_connection_close(upstream_port: int) -> None:
    with socket.create_connection(("127.0.0.1", upstream_port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert b"connection: close" in data
    assert data.endswith(BODY)


def test_load_generator_paces_requests(upstream_port: int) -> None:
    result = asyncio.run(
        run_load("127.0.0.1", upstream_port, ["/a", "/b"], concurrency=3, duration_s=0.5, rate=100)
    )
    data = result.to_dict()
    assert data["errors"] == {}
    # 100 requests/s for 0.5 s: 50 slots; a slow machine may lose the last few.
    assert 30 <= data["completed"] <= 51
    assert min(data["latencies_ms"]) > 0


def test_paced_load_counts_requests_over_window(upstream_port: int) -> None:
    # 2 requests/s for 1 s: both go out in the first half, yet the window is 1 s.
    result = asyncio.run(run_load("127.0.0.1", upstream_port, ["/a"], concurrency=1, duration_s=1.0, rate=2))
    data = result.to_dict()
    assert data["completed"] == 2
    assert data["requests_per_s"] == pytest.approx(2.0)


def test_load_generator_counts_refused_connections() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    result = asyncio.run(
        run_load("127.0.0.1", closed_port, ["/"], concurrency=1, duration_s=0.2, max_requests=3)
    )
    assert result.errors["connect"] == 3
    assert len(result.latencies_ms) == 0


def test_percentiles_use_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentiles(values) == {"p50": 50, "p99": 99, "max": 100}
    assert percentiles([]) == {"p50": None, "p99": None, "max": None}


def test_spread_ignores_missing_values() -> None:
    assert spread([3.0, None, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert spread([None]) == {"median": None, "min": None, "max": None}


def test_histogram_counts_every_value() -> None:
    result = histogram([-0.5, 0.0, 0.05, 1.0, 1.1, 250.0])
    assert sum(result["counts"]) == 6
    edges = result["edges_ms"]
    assert result["counts"][0] == 2
    assert result["counts"][edges.index(1.0)] == 2


def test_sign_test_p_values() -> None:
    assert sign_test(5, 10) == 1.0
    assert sign_test(5, 5) == pytest.approx(0.0625)
    assert sign_test(0, 5) == pytest.approx(0.0625)
    assert sign_test(8, 10) == pytest.approx(0.109375)
    assert sign_test(10, 10) == pytest.approx(2 / 1024)
    assert sign_test(0, 0) == 1.0


def _paired_runs(process_p99: list[float], thread_p99: list[float]) -> list[dict]:
    runs = []
    for repetition, (process, thread) in enumerate(zip(process_p99, thread_p99, strict=True)):
        for mode, p99 in (("baseline", 4.0), ("process", process), ("thread", thread)):
            runs.append({
                "mode": mode,
                "repetition": repetition,
                "ok": True,
                "runs_done": 10,
                "runs_done_ratio": 1.0,
                "lateness_ms": {"p99": 1.0},
                "server": {"latency_ms": {"p99": p99}, "completed": 100, "requests_per_s": 90},
            })
    return runs


PAIRED_MODES = ["baseline", "process", "thread"]
LOAD_SETTINGS = {"load": 5, "rate": 0, "targets": 1, "interval_s": 1.0}


def _loaded_verdict(runs: list[dict], modes: list[str] = PAIRED_MODES) -> str:
    """Return the verdict on ``runs`` measured under API load."""
    return verdict(summarize(runs, modes), modes, LOAD_SETTINGS)


def test_verdict_counts_paired_repetitions() -> None:
    # Thread is lower in one repetition of ten, so process wins 9 of 10 (p = 0.021).
    text = _loaded_verdict(_paired_runs([5.0] * 10, [8.0] * 9 + [4.5]))

    assert "process gave the lowest server p99" in text
    assert "process had the lower server p99 in 9 of 10 against thread (sign test p = 0.021)" in text
    assert "more --repeat" not in text


def test_verdict_flags_a_split_that_noise_explains() -> None:
    text = _loaded_verdict(_paired_runs([5.0, 5.0, 9.0, 5.0], [8.0, 8.0, 6.0, 4.0]))

    assert "in 2 of 4 against thread (sign test p = 1)" in text
    assert "with fewer than 6 repetitions that differ no split can reach p < 0.05" in text
    assert "rerun with --repeat 6 or more" in text


def test_verdict_asks_for_more_repeats() -> None:
    # 5 of 8 is p = 0.73: enough repetitions could tell, these do not.
    text = _loaded_verdict(_paired_runs([5.0] * 5 + [9.0] * 3, [8.0] * 8))

    assert "in 5 of 8 against thread (sign test p = 0.73)" in text
    assert "so more --repeat is needed to rank those modes" in text
    assert "fewer than 6 repetitions" not in text


def test_verdict_reports_cpu_tie() -> None:
    runs = [
        {"mode": mode, "repetition": 0, "ok": True, "runs_done": 100, "cpu_s_per_1000_polls": cpu}
        for mode, cpu in (("thread", 1.5999999999999992), ("process", 1.6000000000000014))
    ]
    settings = {"load": 0, "targets": 1, "interval_s": 1.0}

    text = verdict(summarize(runs, ["thread", "process"]), ["thread", "process"], settings)

    assert "used the same CPU per 1000 polls (1.60 s)" in text
    assert "the most" not in text


def test_verdict_without_baseline_ranks_raw_p99() -> None:
    runs = [run for run in _paired_runs([6.0, 6.0, 6.0], [5.0, 5.0, 5.0]) if run["mode"] != "baseline"]

    text = _loaded_verdict(runs, ["process", "thread"])

    assert "thread gave the lowest server p99." in text
    assert "relative to the baseline." not in text


def test_verdict_qualifies_a_mode_chosen_for_completion() -> None:
    runs = _paired_runs([9.0, 9.0, 9.0], [5.0, 5.0, 5.0])
    for run in runs:
        if run["mode"] == "thread":
            run["runs_done_ratio"] = 0.5

    text = _loaded_verdict(runs)

    assert "process gave the lowest server p99 relative to the baseline of the modes that completed" in text
    assert "in 0 of 3 against thread" in text


def test_verdict_names_mode_with_one_measured_run() -> None:
    runs = [
        run
        for run in _paired_runs([5.0, 5.0, 5.0], [8.0, 8.0, 8.0])
        if not (run["mode"] == "thread" and run["repetition"] > 0)
    ]

    text = _loaded_verdict(runs)

    assert "With one measured repetition of thread" in text
    assert "With one repetition per mode" not in text


def test_verdict_warns_about_one_repetition() -> None:
    text = _loaded_verdict(_paired_runs([5.0], [8.0]))

    assert "With one repetition per mode" in text
    assert "Repetition by repetition" not in text


def test_extra_cpu_subtracts_same_repetition_baseline() -> None:
    def run(mode: str, repetition: int, cpu_s: float, runs_done: int) -> dict:
        return {"mode": mode, "repetition": repetition, "ok": True, "cpu_s": cpu_s, "runs_done": runs_done}

    runs = [
        run("baseline", 0, 5.0, 0),
        run("thread", 0, 6.0, 500),
        run("baseline", 1, 9.0, 0),
        run("thread", 1, 10.5, 500),
    ]
    summary = summarize(runs, ["baseline", "thread"])
    assert summary["thread"][EXTRA_CPU] == {"median": 2.5, "min": 2.0, "max": 3.0}
    assert summary["baseline"][EXTRA_CPU]["median"] is None


def test_table_renders_a_summary_without_newer_figures() -> None:
    summary = summarize([{"mode": "thread", "repetition": 0, "ok": True, "runs_done": 10}], ["thread"])
    del summary["thread"][EXTRA_CPU]
    assert "runs done" in markdown_table(summary, ["thread"], has_load=False)
