"""Configuration loading: the example file, every validator, ``${VAR}`` and secrets.

The broken-config corpus runs the real CLI, ``python -m bgapi check-config FILE``,
once per file and checks the exit code, the message and that no traceback leaks.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest
from helpers import ConfigWriter, run_cli

from bgapi.config import MAX_WARNED_TARGETS, Config, config_from_dict, load_config
from bgapi.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.toml"
SECRET = "s3cr3t-Token-9f8e7d"


class CorpusRun(NamedTuple):
    """A broken config file and how ``check-config`` ended on it."""

    path: Path
    completed: subprocess.CompletedProcess[str]


TARGET = 'name = "api"\nurl = "http://127.0.0.1:9/ok"\n'


def _target(extra: str = "") -> str:
    return "[[targets]]\n" + TARGET + textwrap.dedent(extra)


# id, TOML text, fragments that must all appear on one line of the output.
BAD_CONFIGS: list[tuple[str, str, list[str]]] = [
    (
        "interval-zero",
        _target("interval = 0\n"),
        ["targets[0] ('api').interval", "must be at least 0.001", "got 0"],
    ),
    (
        "interval-negative",
        _target("interval = -5\n"),
        ["targets[0] ('api').interval", "must be at least 0.001", "got -5"],
    ),
    (
        "interval-infinite",
        _target("interval = inf\n"),
        ["targets[0] ('api').interval", "must be a finite number", "got inf"],
    ),
    (
        "timeout-nan",
        "[poller]\ntimeout = nan\n",
        ["poller.timeout", "got nan"],
    ),
    (
        "timeout-zero",
        _target("timeout = 0\n"),
        ["targets[0] ('api').timeout", "must be greater than 0", "got 0"],
    ),
    (
        "poller-interval-zero",
        "[poller]\ninterval = 0\n",
        ["poller.interval", "must be at least 0.001", "got 0"],
    ),
    (
        "failure-threshold-zero",
        _target("failure_threshold = 0\n"),
        ["targets[0] ('api').failure_threshold", "must be at least 1", "got 0"],
    ),
    (
        "success-threshold-fraction",
        _target("success_threshold = 1.5\n"),
        ["targets[0] ('api').success_threshold", "must be a whole number", "got 1.5"],
    ),
    (
        "unknown-key-did-you-mean",
        _target("intervall = 5\n"),
        ["targets[0] ('api')", "unknown key 'intervall'", "did you mean 'interval'?"],
    ),
    (
        "unknown-section-did-you-mean",
        "[sever]\nport = 8000\n",
        ["unknown key 'sever'", "did you mean 'server'?"],
    ),
    (
        "unknown-action-key",
        _target('[[targets.actions]]\ntype = "log"\nonn = "down"\n'),
        ["targets[0] ('api').actions[0]", "unknown key 'onn'", "did you mean 'on'?"],
    ),
    (
        "interval-wrong-type",
        _target('interval = "fast"\n'),
        ["targets[0] ('api').interval", "must be a number", "got 'fast'"],
    ),
    (
        "enabled-wrong-type",
        _target("enabled = 3\n"),
        ["targets[0] ('api').enabled", "must be true or false", "got 3"],
    ),
    (
        "header-wrong-type",
        _target("headers = {Accept = 1}\n"),
        ["targets[0] ('api').headers.Accept", "must be a string", "got 1"],
    ),
    (
        "targets-not-a-list",
        '[targets]\nname = "api"\n',
        ["targets:", "must be a list", "[[...]]"],
    ),
    (
        "duplicate-names",
        _target() + _target(),
        ["targets[1].name", "duplicate target name 'api'", "targets[0]", "unique name"],
    ),
    (
        "url-scheme",
        '[[targets]]\nname = "api"\nurl = "ftp://127.0.0.1/file"\n',
        ["targets[0] ('api').url", "must be an http:// or https:// URL", "'ftp://127.0.0.1/file'"],
    ),
    (
        "url-without-host",
        '[[targets]]\nname = "api"\nurl = "http:///health"\n',
        ["targets[0] ('api').url", "must include a host", "'http:///health'"],
    ),
    (
        "missing-name",
        '[[targets]]\nurl = "http://127.0.0.1:9/ok"\n',
        ["targets[0].name", "missing required key", "add name = ..."],
    ),
    (
        "invalid-name",
        '[[targets]]\nname = "my api"\nurl = "http://127.0.0.1:9/ok"\n',
        ["targets[0] ('my api').name", "letters, digits", "got 'my api'"],
    ),
    (
        "bad-method",
        _target('method = "FETCH"\n'),
        ["targets[0] ('api').method", "must be one of GET", "got 'FETCH'"],
    ),
    (
        "missing-env-var",
        _target('headers = {Authorization = "Bearer ${BGAPI_TEST_UNSET_TOKEN}"}\n'),
        [
            "targets[0].headers.Authorization",
            "environment variable 'BGAPI_TEST_UNSET_TOKEN' is not set",
            "export BGAPI_TEST_UNSET_TOKEN=",
        ],
    ),
    (
        "condition-syntax",
        _target('conditions = ["status = 200"]\n'),
        ["targets[0] ('api').conditions[0]", "invalid condition 'status = 200'", "no operator"],
    ),
    (
        "condition-unknown-subject",
        _target('conditions = ["staus == 200"]\n'),
        ["targets[0] ('api').conditions[0]", "unknown subject 'staus'", "Did you mean 'status'?"],
    ),
    (
        "condition-bad-jmespath",
        _target('conditions = ["json.items[[ == 1"]\n'),
        ["targets[0] ('api').conditions[0]", "JMESPath", "does not compile"],
    ),
    (
        "condition-unquoted-string",
        _target('conditions = ["json.status == none"]\n'),
        ["targets[0] ('api').conditions[0]", "not a JSON literal", 'double quotes: "none"'],
    ),
    (
        "action-unknown-type",
        _target('[[targets.actions]]\ntype = "email"\n'),
        ["targets[0] ('api').actions[0].type", "must be one of 'log' or 'webhook'", "got 'email'"],
    ),
    (
        "action-unknown-on",
        _target('[[targets.actions]]\ntype = "log"\non = "sometimes"\n'),
        [
            "targets[0] ('api').actions[0].on",
            "'change', 'down', 'up' or 'always'",
            "got 'sometimes'",
        ],
    ),
    (
        "webhook-without-url",
        _target('[[targets.actions]]\ntype = "webhook"\n'),
        ["targets[0] ('api').actions[0]", "a webhook action needs a url", 'url = "https://'],
    ),
    (
        "webhook-url-scheme",
        _target('[[targets.actions]]\ntype = "webhook"\nurl = "file:///etc/passwd"\n'),
        ["targets[0] ('api').actions[0].url", "http:// or https://", "'file:///etc/passwd'"],
    ),
    (
        "webhook-too-many-retries",
        _target(
            '[[targets.actions]]\ntype = "webhook"\nurl = "http://127.0.0.1:9/h"\nretries = 11\n'
        ),
        ["targets[0] ('api').actions[0].retries", "must be at most 10", "got 11"],
    ),
    (
        "unknown-mode",
        '[poller]\nmode = "threads"\n',
        ["poller.mode", "must be one of 'thread', 'asyncio', 'apscheduler' or 'process'", "got 'threads'"],
    ),
    (
        "port-too-large",
        "[server]\nport = 70000\n",
        ["server.port", "must be at most 65535", "got 70000"],
    ),
    (
        "port-negative",
        "[server]\nport = -1\n",
        ["server.port", "must be at least 0", "got -1"],
    ),
    (
        "retention-zero",
        "[store]\nretention = 0\n",
        ["store.retention", "must be at least 1", "got 0"],
    ),
    (
        "body-and-json",
        _target('body = "x"\njson = {a = 1}\n'),
        ["targets[0] ('api')", "give either body or json, not both"],
    ),
    (
        "toml-syntax",
        '[server]\nhost = "127.0.0.1"\nport = \n',
        ["line 3, column 8", "invalid TOML"],
    ),
    (
        "toml-unclosed-string",
        '[[targets]]\nname = "api\n',
        ["line 2, column", "invalid TOML"],
    ),
]


@pytest.fixture(scope="module")
def corpus_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CorpusRun]:
    """Run ``check-config`` on every broken config, a few processes at a time."""
    directory = tmp_path_factory.mktemp("bad-configs")
    paths = {}
    for case_id, text, _ in BAD_CONFIGS:
        paths[case_id] = directory / f"{case_id}.toml"
        paths[case_id].write_text(text, encoding="utf-8")
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {
            case_id: pool.submit(run_cli, "check-config", path, cwd=directory)
            for case_id, path in paths.items()
        }
        return {
            case_id: CorpusRun(paths[case_id], future.result())
            for case_id, future in futures.items()
        }


@pytest.mark.parametrize(
    ("case_id", "fragments"),
    [pytest.param(case_id, fragments, id=case_id) for case_id, _, fragments in BAD_CONFIGS],
)
def test_check_config_rejects(
    corpus_runs: dict[str, CorpusRun], case_id: str, fragments: list[str]
) -> None:
    path, completed = corpus_runs[case_id]
    output = completed.stdout + completed.stderr

    assert completed.returncode == 2, output
    assert "Traceback" not in output
    assert "invalid configuration" in completed.stderr
    matching = [line for line in output.splitlines() if fragments[0] in line]
    assert matching, f"no line contains {fragments[0]!r}:\n{output}"
    line = matching[0]
    assert str(path) in line, "the problem line names the file"
    for fragment in fragments[1:]:
        assert fragment in line, f"{fragment!r} missing from: {line}"


def test_corpus_has_twenty_broken_configs() -> None:
    assert len(BAD_CONFIGS) >= 20
    assert len({case_id for case_id, _, _ in BAD_CONFIGS}) == len(BAD_CONFIGS)


def test_check_config_lists_every_problem(make_config: ConfigWriter) -> None:
    path = make_config(
        '[server]\nport = 70000\n[poller]\nmode = "x"\n' + _target("interval = 0\n"),
        name="three.toml",
    )

    completed = run_cli("check-config", path, cwd=path.parent)
    problem_lines = [line for line in completed.stderr.splitlines() if line.startswith("  ")]

    assert completed.returncode == 2
    assert "3 problem(s)" in completed.stderr
    assert len(problem_lines) == 3, completed.stderr


def test_check_config_missing_file(tmp_path: Path) -> None:
    completed = run_cli("check-config", tmp_path / "nope.toml", cwd=tmp_path)

    assert completed.returncode == 2
    assert "nope.toml: file not found" in completed.stderr
    assert "Traceback" not in completed.stderr


# The example configuration -----------------------------------------------------------


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE)

    assert config.source == str(EXAMPLE)
    assert config.server.port == 8000
    assert [target.name for target in config.targets] == ["github-status", "python-status", "self"]
    assert all(target.interval_s > 0 for target in config.targets)
    assert all(target.timeout_s > 0 for target in config.targets)


def test_example_config_checks_ok(tmp_path: Path) -> None:
    completed = run_cli("check-config", EXAMPLE, cwd=tmp_path)

    assert completed.returncode == 0, completed.stderr
    assert "OK, 3 target(s), 3 enabled" in completed.stdout
    assert not (tmp_path / "bgapi.db").exists(), "check-config must not open the store"


# Defaults and warnings ---------------------------------------------------------------


def test_targets_inherit_poller_defaults() -> None:
    config = config_from_dict(
        {
            "poller": {"interval": 7, "timeout": 3},
            "targets": [
                {"name": "a", "url": "http://127.0.0.1:9/"},
                {"name": "b", "url": "http://127.0.0.1:9/", "interval": 0.25, "timeout": 1},
            ],
        }
    )

    assert config.targets[0].interval_s == 7
    assert config.targets[0].timeout_s == 3
    assert config.targets[1].interval_s == 0.25
    assert config.targets[1].timeout_s == 1
    assert config.targets[0].failure_threshold == 1
    assert config.targets[0].success_threshold == 1
    assert config.targets[0].method == "GET"


def test_method_is_upper_cased() -> None:
    config = config_from_dict(
        {"targets": [{"name": "a", "url": "http://x.test/", "method": "post"}]}
    )

    assert config.targets[0].method == "POST"


def test_timeout_above_interval_is_a_warning(make_config: ConfigWriter) -> None:
    path = make_config(_target("interval = 0.5\ntimeout = 2\n"))

    completed = run_cli("check-config", path, cwd=path.parent)

    assert completed.returncode == 0, completed.stderr
    assert (
        "warning: target 'api': timeout 2 s is longer than its interval 0.5 s" in completed.stderr
    )


def test_repeated_warning_counts_other_targets() -> None:
    targets = [
        {"name": f"t{index}", "url": f"http://127.0.0.1/{index}", "interval": 1, "timeout": 5}
        for index in range(50)
    ]
    config = config_from_dict({"targets": targets})

    warnings = config.startup_warnings()

    assert len(warnings) == MAX_WARNED_TARGETS + 1
    assert warnings[0].startswith("target 't0': timeout 5 s is longer than its interval 1 s")
    assert warnings[-1] == f"{50 - MAX_WARNED_TARGETS} more targets have a timeout longer than the interval"


def test_few_repeated_warnings_are_all_listed() -> None:
    targets = [
        {"name": f"t{index}", "url": "https://127.0.0.1/", "verify": False}
        for index in range(MAX_WARNED_TARGETS + 1)
    ]

    warnings = config_from_dict({"targets": targets}).startup_warnings()

    assert len(warnings) == MAX_WARNED_TARGETS + 1
    assert all("verification is off" in warning for warning in warnings)


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ({"interval": "30s"}, "got '30s'; write the seconds as a bare number: interval = 30"),
        ({"interval": "5m"}, "got '5m'; write the seconds as a bare number: interval = 300"),
        ({"timeout": "500ms"}, "got '500ms'; write the seconds as a bare number: timeout = 0.5"),
        ({"failure_threshold": "2"}, "got '2'; remove the quotes: failure_threshold = 2"),
        ({"interval": "1234567s"}, "write the seconds as a bare number: interval = 1234567"),
    ],
)
def test_quoted_number_error_suggests_fix(field: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"targets": [{"name": "a", "url": "http://127.0.0.1/", **field}]})

    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].endswith(expected)


@pytest.mark.parametrize(
    ("field", "expected_end"),
    [
        ({"interval": "soon"}, "must be a number, got 'soon'"),
        # A unit converts only for durations, and a whole number must stay whole.
        ({"failure_threshold": "2s"}, "must be a whole number, got '2s'"),
        ({"failure_threshold": "2.5"}, "must be a whole number, got '2.5'"),
        ({"interval": "9" * 30}, f"must be a number, got '{'9' * 30}'"),
    ],
)
def test_quoted_value_without_safe_fix(field: dict, expected_end: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"targets": [{"name": "a", "url": "http://127.0.0.1/", **field}]})

    assert caught.value.problems[0].endswith(expected_end)


def test_unit_not_converted_for_byte_limit() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"poller": {"max_body_bytes": "1m"}})

    assert caught.value.problems[0].endswith("must be a whole number, got '1m'")


def test_quoted_secret_gets_no_fix(tmp_path: Path) -> None:
    path = tmp_path / "secret.toml"
    path.write_text(
        '[[targets]]\nname = "a"\nurl = "http://127.0.0.1/"\ninterval = "${SECRET_INTERVAL}"\n',
        encoding="utf-8",
    )

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={"SECRET_INTERVAL": "987654321"})

    assert "987654321" not in str(caught.value)
    assert caught.value.problems[0].endswith("must be a number, got '***'")


def test_config_error_lists_problems() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"server": {"port": 70000}, "store": {"retention": 0}}, source="x.toml")

    assert len(caught.value.problems) == 2
    assert all(problem.startswith("x.toml: ") for problem in caught.value.problems)


# ${VAR} substitution and secrets -----------------------------------------------------

SECRET_TOML = """
[[targets]]
name = "api"
url = "http://127.0.0.1:9/echo?key=${API_KEY}"
headers = { Authorization = "Bearer ${API_TOKEN}", X-Plain = "cost $$5" }

  [[targets.actions]]
  type = "webhook"
  url = "http://127.0.0.1:9/webhook"
  headers = { X-Api-Key = "${API_TOKEN}" }
"""


def _secret_env() -> dict[str, str]:
    return {"API_TOKEN": SECRET, "API_KEY": "key-" + SECRET}


def test_env_vars_are_substituted(make_config: ConfigWriter) -> None:
    config = load_config(make_config(SECRET_TOML), environ=_secret_env())
    target = config.targets[0]

    assert target.url == f"http://127.0.0.1:9/echo?key=key-{SECRET}"
    assert target.headers["Authorization"] == f"Bearer {SECRET}"
    assert target.headers["X-Plain"] == "cost $5"
    assert target.actions[0].headers["X-Api-Key"] == SECRET


def test_secrets_absent_from_repr(make_config: ConfigWriter) -> None:
    config = load_config(make_config(SECRET_TOML), environ=_secret_env())

    for text in (
        repr(config),
        str(config),
        repr(config.targets[0]),
        repr(config.targets[0].actions[0]),
    ):
        assert SECRET not in text
    assert "***" in repr(config.targets[0])


def test_redact_masks_secrets(make_config: ConfigWriter) -> None:
    config = load_config(make_config(SECRET_TOML), environ=_secret_env())

    redacted = config.redact(f"GET /echo?key=key-{SECRET} failed")

    assert SECRET not in redacted
    assert redacted.startswith("GET /echo?key=")
    assert redacted.endswith("*** failed")


def test_missing_env_var_is_config_error(make_config: ConfigWriter) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(make_config(SECRET_TOML), environ={"API_TOKEN": SECRET})

    assert len(caught.value.problems) == 1
    assert "'API_KEY' is not set" in caught.value.problems[0]
    assert "targets[0].url" in caught.value.problems[0]


def test_check_config_hides_secret_in_ok_output(make_config: ConfigWriter) -> None:
    path = make_config(SECRET_TOML)

    completed = run_cli("check-config", path, cwd=path.parent, env=_secret_env())

    assert completed.returncode == 0, completed.stderr
    assert SECRET not in completed.stdout + completed.stderr


def test_check_config_hides_secret_in_errors(make_config: ConfigWriter) -> None:
    path = make_config(_target('interval = "${API_TOKEN}"\nurl_x = 1\n'))

    completed = run_cli("check-config", path, cwd=path.parent, env=_secret_env())
    output = completed.stdout + completed.stderr

    assert completed.returncode == 2
    assert SECRET not in output
    assert "targets[0] ('api').interval: must be a number, got '***'" in output


def test_validated_config_type() -> None:
    config = config_from_dict({})

    assert isinstance(config, Config)
    assert config.targets == []
    assert config.poller.mode == "thread"
    assert config.server.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("fields", "fragments"),
    [
        ('url = "http://127.0.0.1:99999/x"\n', ["url", "invalid port"]),
        ('url = "http://127.0.0.1/x"\nheaders = { X-Name = "café" }\n', ["headers", "must be ASCII"]),
        ('url = "http://127.0.0.1/x"\njson = { when = 1979-05-27 }\n', ["json", "no JSON form"]),
        ('url = "http://127.0.0.1/x"\ninterval = 1e12\n', ["interval", "must be at most"]),
        ('url = "http://127.0.0.1/x"\nca_bundle = "/etc/hostname"\n', ["ca_bundle", "not a PEM file"]),
    ],
)
def test_values_that_fail_only_at_poll_time(
    tmp_path: Path, fields: str, fragments: list[str]
) -> None:
    # Each of these used to pass check-config and then fail every poll as "internal".
    path = tmp_path / "bgapi.toml"
    path.write_text(f'[[targets]]\nname = "api"\n{fields}', encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message


def test_every_problem_in_one_run(tmp_path: Path) -> None:
    # An unset variable, a duplicate name and body-with-json used to hide the
    # other problems until they were fixed.
    path = tmp_path / "bgapi.toml"
    path.write_text(
        textwrap.dedent(
            """
            [[targets]]
            name = "dup"
            url = "${BGAPI_TEST_UNSET_VARIABLE}"
            interval = 0
            [[targets]]
            name = "dup"
            url = "http://127.0.0.1:1/"
            body = "x"
            json = { a = 1 }
            """
        ),
        encoding="utf-8",
    )

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})

    problems = caught.value.problems
    assert len(problems) == 4, problems
    assert any("'BGAPI_TEST_UNSET_VARIABLE' is not set" in line for line in problems)
    assert any("duplicate target name 'dup'" in line for line in problems)
    assert any("give either body or json, not both" in line for line in problems)
    assert any("interval: must be at least 0.001" in line for line in problems)
