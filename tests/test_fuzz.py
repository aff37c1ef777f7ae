"""Property-based and schema-driven tests: random input never crashes bgapi.

- hypothesis feeds random condition strings through the whole config loader
  (the parser alone is covered in test_conditions.py) and random headers to
  the token and signature checks;
- schemathesis reads the real server's ``/openapi.json`` and sends generated
  requests to every operation: none may return 500.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from helpers import RunningBgapi, render_config, run_bgapi
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from upstream import Upstream

from bgapi.config import config_from_dict
from bgapi.errors import ConfigError
from bgapi.security import token_matches, verify_signature
from bgapi.server import create_app

TOKEN = "fuzz-token-" + "4" * 24
# Keeps the schemathesis run well under a minute on a slow machine.
SCHEMA_MAX_EXAMPLES = 30


# Config loader ----------------------------------------------------------------------------


CONDITION_PIECES = [
    "status", "json.", "json.a", "body", "header.x", "elapsed_ms", "==", "<", "contains",
    "200", '"x"', "`1`", "[", "]", "${X}", "$$", "\\", "\n",
]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(max_size=40),
            st.lists(st.sampled_from(CONDITION_PIECES), max_size=8).map(" ".join),
        ),
        max_size=3,
    )
)
def test_config_random_conditions_only_config_error(conditions: list[str]) -> None:
    data = {"targets": [{"name": "t", "url": "http://127.0.0.1/", "conditions": conditions}]}
    started = time.monotonic()
    try:
        config = config_from_dict(data, environ={"X": "1"})
    except ConfigError as error:
        assert error.problems
        assert all("Traceback" not in problem for problem in error.problems)
    else:
        assert len(config.targets[0].conditions) == len(conditions)
    assert time.monotonic() - started < 1.0


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60), st.sampled_from(["", "Bearer ", "bearer  ", "Basic "]))
def test_token_check_random_header(credentials: str, scheme: str) -> None:
    assume(credentials.strip() != TOKEN)

    assert token_matches(TOKEN, scheme + credentials) is False
    assert token_matches(TOKEN, f"{scheme}{TOKEN}") is scheme.lower().startswith("bearer")


OPTIONAL_TEXT = st.one_of(st.none(), st.text(max_size=80))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60), OPTIONAL_TEXT, OPTIONAL_TEXT)
def test_verify_signature_random_input(
    body: bytes, timestamp: str | None, signature: str | None
) -> None:
    assert verify_signature("secret", body, timestamp, signature) is False


# OpenAPI schema against the real server ---------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_upstream() -> Iterator[Upstream]:
    with Upstream() as server:
        yield server


@pytest.fixture(scope="module")
def bgapi_server(
    fuzz_upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningBgapi]:
    directory: Path = tmp_path_factory.mktemp("fuzz")
    config = directory / "fuzz.toml"
    config.write_text(
        render_config(
            store={"path": directory / "bgapi.db"},
            # Requests with a fixed name aim at "a"; the others are up, down and JSON.
            targets=[
                {"name": "a", "url": fuzz_upstream.url("/ok"), "interval": 0.5, "timeout": 1},
                {
                    "name": "0",
                    "url": fuzz_upstream.url("/status/500"),
                    "interval": 0.5,
                    "timeout": 1,
                },
                {"name": "api", "url": fuzz_upstream.url("/json"), "interval": 0.5, "timeout": 1},
            ],
        ),
        encoding="utf-8",
    )
    with run_bgapi(config, env={"BGAPI_TOKEN": TOKEN}) as running:
        yield running


def operation_labels() -> list[str]:
    """Return "METHOD /path" for every operation the app documents, built in-process.

    Collection needs the list before any server runs; each test then loads the
    operation from the running server's /openapi.json.
    """
    config = config_from_dict({"store": {"path": "unused.db"}})
    document = create_app(config, poll=False).openapi()
    return [
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method in item
        if method.upper() in {"GET", "POST", "PUT", "PATCH", "DELETE"}
    ]


@pytest.fixture(scope="module")
def api_schema(bgapi_server: RunningBgapi) -> Any:
    return schemathesis.openapi.from_url(f"{bgapi_server.base_url}/openapi.json")


# NOTE: schemathesis.pytest.from_fixture() fails under pytest 9.2 (schemathesis
# 4.32.5 sets the private Function._nodeid), so the strategies are used directly.
@pytest.mark.parametrize("label", operation_labels())
@pytest.mark.parametrize("with_token", [True, False], ids=["token", "no-token"])
def test_api_no_server_error(api_schema: Any, label: str, with_token: bool) -> None:
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, f"the server does not document {label}"
    headers = {"Authorization": f"Bearer {TOKEN}"} if with_token else {}
    # Valid requests, invalid ones, and valid ones aimed at a configured target.
    strategy = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(
        GenerationMode.NEGATIVE
    )
    if "{name}" in operation.path:
        strategy |= operation.as_strategy(path_parameters={"name": "a"})

    @settings(
        max_examples=SCHEMA_MAX_EXAMPLES if with_token else SCHEMA_MAX_EXAMPLES // 3,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=strategy)
    def call(case: Any) -> None:
        case.call_and_validate(headers=headers, checks=[not_a_server_error], timeout=10)

    call()
