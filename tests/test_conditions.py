"""Tests for bgapi.conditions: parsing condition strings and evaluating them."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bgapi.conditions import (
    DEFAULT_CONDITIONS,
    MAX_CONDITION_LENGTH,
    OPERATORS,
    Condition,
    ConditionFailure,
    ResponseView,
    default_conditions,
    evaluate,
    parse_condition,
    parse_conditions,
)
from bgapi.errors import BgapiError, ConditionError

STATUS_PAGE = json.dumps(
    {
        "status": {"indicator": "none", "description": "All Systems Operational"},
        "items": [
            {"id": 7, "state": "up", "name": "api"},
            {"id": 8, "state": "down", "name": "db"},
            {"id": 9, "state": "up", "name": "cdn"},
        ],
        "tags": ["prod", 3, True, None],
        "count": 3,
        "ratio": 0.5,
        "enabled": True,
        "missing_value": None,
        "name": "alpha",
    }
).encode()


def make_response(
    status: int = 200,
    elapsed_ms: float = 120.0,
    headers: dict[str, str] | None = None,
    body: bytes = STATUS_PAGE,
) -> ResponseView:
    """Build a ResponseView with httpx.Headers, as the poller passes them."""
    return ResponseView(status, elapsed_ms, httpx.Headers(headers or {}), body)


# --- parsing -------------------------------------------------------------------------------

PARSED = [
    ("status == 200", "status", None, "==", 200),
    ("  status != 503  ", "status", None, "!=", 503),
    ("elapsed_ms < 2000", "elapsed_ms", None, "<", 2000),
    ("elapsed_ms <= 1.5e3", "elapsed_ms", None, "<=", 1500.0),
    ("status > 199", "status", None, ">", 199),
    ("status >= 200", "status", None, ">=", 200),
    ('body contains "ok"', "body", None, "contains", "ok"),
    ("body == 42", "body", None, "==", 42),
    ('header.content-type contains "json"', "header", "content-type", "contains", "json"),
    ('header.Content-Type == "text/plain"', "header", "content-type", "==", "text/plain"),
    ("header.x-count >= 5", "header", "x-count", ">=", 5),
    ("header.etag == null", "header", "etag", "==", None),
    ('json.status.indicator == "none"', "json", "status.indicator", "==", "none"),
    ("json.items[0].id == 7", "json", "items[0].id", "==", 7),
    ("json.length(items) > 2", "json", "length(items)", ">", 2),
    ("json.enabled == true", "json", "enabled", "==", True),
    ("json.missing_value == null", "json", "missing_value", "==", None),
    ('json.tags == ["prod", 3]', "json", "tags", "==", ["prod", 3]),
    ('json.status == {"a": 1}', "json", "status", "==", {"a": 1}),
    ('json.name < "b"', "json", "name", "<", "b"),
    ("json.tags contains 3", "json", "tags", "contains", 3),
    ("json.@ != null", "json", "@", "!=", None),
    # Operators inside the JMESPath or inside the quoted value.
    (
        "json.items[?state == 'up'] | length(@) > 0",
        "json",
        "items[?state == 'up'] | length(@)",
        ">",
        0,
    ),
    ('body contains "a == b"', "body", None, "contains", "a == b"),
    ('body contains "x contains y"', "body", None, "contains", "x contains y"),
    ('body == "1 < 2 > 0"', "body", None, "==", "1 < 2 > 0"),
    (
        'json.items[?id >= `8`].name contains "db"',
        "json",
        "items[?id >= `8`].name",
        "contains",
        "db",
    ),
    ("status\t==\t200", "status", None, "==", 200),
]


@pytest.mark.parametrize(("text", "subject", "path", "operator", "expected"), PARSED)
def test_parse_condition_fields(
    text: str, subject: str, path: str | None, operator: str, expected: object
) -> None:
    condition = parse_condition(text)

    assert condition.text == text.strip()
    assert condition.subject == subject
    assert condition.path == path
    assert condition.operator == operator
    assert condition.expected == expected
    assert type(condition.expected) is type(expected)


PARSE_ERRORS = [
    ("", ["invalid condition ''", "it is empty", "status == 200"]),
    ("   ", ["invalid condition ''", "it is empty"]),
    ("status==200", ["'status==200'", "no operator found", "with spaces around it"]),
    ("status 200", ["no operator found", "==, !=, <, <=, >, >=, contains"]),
    ("status ==", ["the value is missing", "JSON literal"]),
    ("== 200", ["the subject is missing", "before the operator"]),
    (
        "status == ok",
        [
            "invalid condition 'status == ok'",
            "value 'ok' is not a JSON literal",
            'double quotes: "ok"',
        ],
    ),
    ("json.a == up down", ["value 'up down' is not a JSON literal", '"up down"']),
    ("status == 'ok'", ["value 'ok' uses single quotes", 'double quotes: "ok"']),
    ("status == NaN", ["value 'NaN' is not a JSON literal"]),
    ("elapsed_ms < Infinity", ["value 'Infinity' is not a JSON literal"]),
    (
        'body contains "a == b',
        ["value '\"a == b' is not valid JSON", "Unterminated string", "quotes"],
    ),
    ("body contains a == b", ["value 'a == b' is not a JSON literal", '"a == b"']),
    ("staus == 200", ["unknown subject 'staus'", "Did you mean 'status'?", "json.<JMESPath>"]),
    ("jsn.a == 1", ["unknown subject 'jsn.a'", "Did you mean 'json.a'?"]),
    ("Elapsed == 1", ["unknown subject 'Elapsed'", "Did you mean 'elapsed_ms'?"]),
    ("zzz == 1", ["unknown subject 'zzz'", "Subjects are: status, elapsed_ms, body"]),
    ("status code == 200", ["unknown subject 'status code'"]),
    ("json. == 1", ["json. needs a JMESPath expression", "json.status.indicator"]),
    ("json == 1", ["json. needs a JMESPath expression"]),
    ("json.items[ == 1", ["JMESPath 'items[' does not compile", "incomplete", "after 'json.'"]),
    ("json.a..b == 1", ["JMESPath 'a..b' does not compile", "at column 2"]),
    ("json.'abc == 1", ["does not compile", "Unclosed ' delimiter"]),
    ("json.lenght(items) > 0", ["unknown function lenght()", "Did you mean length()?"]),
    ("json.length(a, b) > 0", ["calls length() with 2 arguments", "it takes 1"]),
    ("json.merge() == null", ["calls merge() with 0 arguments", "it takes 1 or more"]),
    ("header. == 1", ["header. needs a header name", "header.content-type"]),
    ("header == 1", ["header. needs a header name"]),
    ("header.x:y == 1", ["'x:y' is not a valid header name"]),
    ('status == "200"', ['status needs a number value, got "200"', "Write it without quotes: 200"]),
    ("status == true", ["status needs a number value, got true"]),
    ("elapsed_ms < null", ["elapsed_ms needs a number value, got null"]),
    ("status contains 2", ["contains does not apply to status", "which is a number"]),
    ("elapsed_ms contains 2", ["contains does not apply to elapsed_ms"]),
    ("body contains 5", ["contains on body needs a string value, got 5", 'double quotes: "5"']),
    ("header.etag contains true", ["contains on a header needs a string value, got true"]),
    ('body < "a"', ['< on body needs a number value, got "a"']),
    ('header.x >= "1"', [">= on a header needs a number value"]),
    ("body == null", ["body can only be compared with a string or a number, got null"]),
    ("header.x == [1]", ["header x can only be compared with a string, a number or null"]),
    ("json.a < null", ["< needs a number or a string value, got null"]),
    ("json.a >= [1]", [">= needs a number or a string value, got [1]"]),
    ("json.a > true", ["> needs a number or a string value, got true"]),
]


@pytest.mark.parametrize(("text", "fragments"), PARSE_ERRORS)
def test_parse_condition_error_message(text: str, fragments: list[str]) -> None:
    with pytest.raises(ConditionError) as raised:
        parse_condition(text)

    message = str(raised.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_parse_condition_rejects_too_long_text() -> None:
    text = "body contains " + json.dumps("x" * MAX_CONDITION_LENGTH)

    with pytest.raises(ConditionError, match="more than the maximum of 2000"):
        parse_condition(text)


def test_parse_condition_rejects_non_string() -> None:
    with pytest.raises(ConditionError, match="it must be a string, not int"):
        parse_condition(200)  # type: ignore[arg-type]


def test_condition_error_is_bgapi_error() -> None:
    with pytest.raises(BgapiError):
        parse_condition("nope")


def test_parse_conditions_reports_first_bad() -> None:
    with pytest.raises(ConditionError) as raised:
        parse_conditions(["status == 200", "staus == 200", "body == ok"])

    assert "'staus == 200'" in str(raised.value)
    assert "body == ok" not in str(raised.value)


def test_parse_conditions_keeps_order() -> None:
    conditions = parse_conditions(["status == 200", 'body contains "ok"'])

    assert [condition.subject for condition in conditions] == ["status", "body"]


def test_condition_equality_ignores_expression() -> None:
    assert parse_condition("json.a == 1") == parse_condition("json.a == 1")
    assert hash(parse_condition("json.a == 1")) == hash(parse_condition(" json.a == 1 "))


def test_condition_repr_omits_expression() -> None:
    assert "_expression" not in repr(parse_condition("json.a == 1"))


@pytest.mark.parametrize(
    ("text", "needs_json"),
    [
        ("json.a == 1", True),
        ("status == 200", False),
        ('body contains "{"', False),
        ('header.content-type contains "json"', False),
        ("elapsed_ms < 5", False),
    ],
)
def test_condition_needs_json(text: str, needs_json: bool) -> None:
    assert parse_condition(text).needs_json is needs_json


def test_operators_constant() -> None:
    assert OPERATORS == ("==", "!=", "<", "<=", ">", ">=", "contains")


# --- evaluation ----------------------------------------------------------------------------

PASSING = [
    # status
    ("status == 200", {}),
    ("status == 200.0", {}),
    ("status != 503", {}),
    ("status < 300", {}),
    ("status <= 200", {}),
    ("status > 199", {}),
    ("status >= 200", {}),
    # elapsed_ms
    ("elapsed_ms < 2000", {"elapsed_ms": 1999.9}),
    ("elapsed_ms <= 120", {}),
    ("elapsed_ms > 100", {}),
    ("elapsed_ms >= 120.0", {}),
    ("elapsed_ms == 120", {}),
    ("elapsed_ms != 121", {}),
    # json slices: omitted bounds are None in the syntax tree
    ("json.items[:2] == [1, 2]", {"body": b'{"items": [1, 2, 3]}'}),
    ("json.items[::-1] == [3, 2, 1]", {"body": b'{"items": [1, 2, 3]}'}),
    ("json.length(items[1:]) == 2", {"body": b'{"items": [1, 2, 3]}'}),
    # body
    ('body contains "ok"', {"body": b"all ok"}),
    ('body contains "a == b"', {"body": b"if a == b:"}),
    ('body == "pong"', {"body": b"pong"}),
    ('body != "pong"', {"body": b"ping"}),
    ("body == 42", {"body": b" 42\n"}),
    ("body > 41.5", {"body": b"42"}),
    ("body <= 1e3", {"body": b"1000"}),
    ('body contains "\\ufffdok"', {"body": b"\xffok"}),
    ('body contains "é"', {"body": "café".encode()}),
    # header
    ('header.content-type contains "json"', {"headers": {"Content-Type": "application/json"}}),
    ('header.CONTENT-TYPE == "text/plain"', {"headers": {"content-type": "text/plain"}}),
    ('header.x-id != "b"', {"headers": {"X-Id": "a"}}),
    ("header.x-count == 5", {"headers": {"X-Count": "5"}}),
    ("header.x-count == 5", {"headers": {"X-Count": "5.0"}}),
    ("header.x-count > 4", {"headers": {"X-Count": " 5 "}}),
    ("header.x-count < 1e3", {"headers": {"X-Count": "999"}}),
    ("header.x-count != 4", {"headers": {"X-Count": "5"}}),
    ("header.etag == null", {}),
    ('header.etag != "abc"', {}),
    ("header.etag != null", {"headers": {"ETag": "abc"}}),
    # json: equality
    ('json.status.indicator == "none"', {}),
    ('json.status.indicator != "major"', {}),
    ("json.items[0].id == 7", {}),
    ("json.items[0].id == 7.0", {}),
    ("json.count == 3", {}),
    ("json.ratio == 0.5", {}),
    ("json.enabled == true", {}),
    ("json.enabled != 1", {}),
    ("json.count != true", {}),
    ("json.missing_value == null", {}),
    ("json.no_such_field == null", {}),
    ('json.tags == ["prod", 3, true, null]', {}),
    ('json.tags != ["prod", 3, 1, null]', {}),
    ('json.items[0] == {"id": 7, "state": "up", "name": "api"}', {}),
    ("json.@ == 5", {"body": b"5"}),
    ('json.@ == "ok"', {"body": b'"ok"'}),
    ("json.@ == null", {"body": b"null"}),
    # json: ordering and functions
    ("json.length(items) > 2", {}),
    ("json.items[?state == 'up'] | length(@) > 0", {}),
    ("json.items[?state == 'up'] | length(@) == 2", {}),
    ("json.count >= 3", {}),
    ("json.ratio < 1", {}),
    ("json.ratio <= 0.5", {}),
    ('json.name < "b"', {}),
    ('json.name >= "alpha"', {}),
    # json: contains
    ('json.status.description contains "Operational"', {}),
    ('json.tags contains "prod"', {}),
    ("json.tags contains 3", {}),
    ("json.tags contains 3.0", {}),
    ("json.tags contains true", {}),
    ("json.tags contains null", {}),
    ('json.items[*].name contains "db"', {}),
    ('json.items contains {"id": 8, "state": "down", "name": "db"}', {}),
]


@pytest.mark.parametrize(("text", "response_args"), PASSING)
def test_evaluate_passes(text: str, response_args: dict[str, object]) -> None:
    response = make_response(**response_args)  # type: ignore[arg-type]

    assert evaluate([parse_condition(text)], response) == []


FAILING = [
    # status
    ("status == 200", {"status": 503}, "status is 503"),
    ("status != 200", {}, "status is 200"),
    ("status < 300", {"status": 300}, "status is 300"),
    ("status <= 299", {"status": 301}, "status is 301"),
    ("status > 200", {}, "status is 200"),
    ("status >= 200", {"status": 199}, "status is 199"),
    # elapsed_ms
    ("elapsed_ms < 2000", {"elapsed_ms": 2350.46}, "elapsed_ms is 2350.5"),
    ("elapsed_ms < 2000", {"elapsed_ms": 2000.0}, "elapsed_ms is 2000.0"),
    ("elapsed_ms > 500", {"elapsed_ms": 12.0}, "elapsed_ms is 12.0"),
    ("elapsed_ms == 5", {"elapsed_ms": 5.01}, "elapsed_ms is 5.0"),
    # body
    ('body contains "ok"', {"body": b"error"}, 'body does not contain "ok"'),
    ('body contains "OK"', {"body": b"ok"}, 'body does not contain "OK"'),
    ('body == "pong"', {"body": b"ping"}, 'body is "ping"'),
    ('body != "pong"', {"body": b"pong"}, 'body is "pong"'),
    ("body == 42", {"body": b"forty-two"}, 'body is "forty-two", not a number'),
    ("body > 50", {"body": b"42"}, "body is 42"),
    ('body == "x"', {"body": b"y" * 500}, 'body is "' + "y" * 56 + "..."),
    ('body contains "ok"', {"body": b"\xff\xfe"}, 'body does not contain "ok"'),
    # header
    ('header.content-type contains "json"', {}, "header content-type is missing"),
    ("header.x-count > 5", {}, "header x-count is missing"),
    ('header.x-id == "a"', {}, "header x-id is missing"),
    (
        'header.content-type contains "json"',
        {"headers": {"Content-Type": "text/html"}},
        'header content-type does not contain "json"',
    ),
    ('header.x-id == "a"', {"headers": {"X-Id": "b"}}, 'header x-id is "b"'),
    ('header.x-id == "a"', {"headers": {"X-Id": "A"}}, 'header x-id is "A"'),
    (
        "header.x-count > 5",
        {"headers": {"X-Count": "abc"}},
        'header x-count is "abc", not a number',
    ),
    (
        "header.x-count == 5",
        {"headers": {"X-Count": "0x5"}},
        'header x-count is "0x5", not a number',
    ),
    (
        "header.x-count != 5",
        {"headers": {"X-Count": "n/a"}},
        'header x-count is "n/a", not a number',
    ),
    ("header.x-count > 5", {"headers": {"X-Count": "5"}}, "header x-count is 5"),
    ("header.etag == null", {"headers": {"ETag": "abc"}}, 'header etag is "abc"'),
    ("header.etag != null", {}, "header etag is missing"),
    # json: equality
    (
        'json.status.indicator == "none"',
        {"body": b'{"status": {"indicator": "minor"}}'},
        'json.status.indicator is "minor"',
    ),
    ('json.status.indicator != "none"', {}, 'json.status.indicator is "none"'),
    ("json.count == 4", {}, "json.count is 3"),
    ('json.count == "3"', {}, "json.count is 3"),
    ("json.name == 1", {}, 'json.name is "alpha"'),
    ("json.enabled == 1", {}, "json.enabled is true"),
    ("json.count == true", {}, "json.count is 3"),
    ("json.no_such_field == 1", {}, "json.no_such_field is null"),
    ("json.missing_value != null", {}, "json.missing_value is null"),
    ('json.tags == ["prod"]', {}, 'json.tags is ["prod", 3, true, null]'),
    ('json.tags == ["prod", 3, 1, null]', {}, 'json.tags is ["prod", 3, true, null]'),
    # json: ordering
    ("json.count > 3", {}, "json.count is 3"),
    ("json.length(items) > 5", {}, "json.length(items) is 3"),
    (
        "json.items[?state == 'gone'] | length(@) > 0",
        {},
        "json.items[?state == 'gone'] | length(@) is 0",
    ),
    ("json.name > 1", {}, "json.name is a string, not a number"),
    ("json.enabled > 0", {}, "json.enabled is a boolean, not a number"),
    ("json.no_such_field < 10", {}, "json.no_such_field is null, not a number"),
    ("json.tags >= 1", {}, "json.tags is an array, not a number"),
    ("json.status <= 1", {}, "json.status is an object, not a number"),
    ('json.count < "b"', {}, "json.count is a number, not a string"),
    ('json.name > "b"', {}, 'json.name is "alpha"'),
    # json: contains
    ('json.name contains "z"', {}, 'json.name does not contain "z"'),
    (
        "json.name contains 1",
        {},
        "json.name is a string, so the value to find must be a string, not a number",
    ),
    ('json.tags contains "dev"', {}, 'json.tags does not contain "dev"'),
    ("json.tags contains 1", {}, "json.tags does not contain 1"),
    ("json.tags contains false", {}, "json.tags does not contain false"),
    ('json.status contains "indicator"', {}, "json.status is an object, not a string or an array"),
    ("json.count contains 3", {}, "json.count is a number, not a string or an array"),
    ('json.no_such_field contains "a"', {}, "json.no_such_field is null, not a string or an array"),
    # json: search errors at run time
    (
        "json.length(count) > 0",
        {},
        (
            "json.length(count) failed: In function length(), invalid type for value: 3, "
            "expected one of: ['string', 'array', 'object'], received: \"number\""
        ),
    ),
    # json: invalid bodies
    (
        "json.a == 1",
        {"body": b"not json"},
        "body is not valid JSON: Expecting value at line 1 column 1",
    ),
    ("json.a == 1", {"body": b""}, "body is not valid JSON: Expecting value at line 1 column 1"),
    (
        "json.a == 1",
        {"body": b'{"a": 1'},
        "body is not valid JSON: Expecting ',' delimiter at line 1 column 8",
    ),
    (
        "json.a == 1",
        {"body": b'"abc'},
        "body is not valid JSON: Unterminated string starting at line 1 column 1",
    ),
    (
        "json.a == 1",
        {"body": b'{"a": "\xff"}'},
        "body is not valid JSON: invalid utf-8 at byte 7: invalid start byte",
    ),
    ("json.a == 1", {"body": b"[" * 100_000}, "body is not valid JSON: nested too deeply"),
    (
        "json.a == 1",
        {"body": b"1" * 5000},
        "body is not valid JSON: Exceeds the limit (4300 digits) for integer string conversion",
    ),
]


@pytest.mark.parametrize(("text", "response_args", "reason"), FAILING)
def test_evaluate_fails_with_reason(
    text: str, response_args: dict[str, object], reason: str
) -> None:
    response = make_response(**response_args)  # type: ignore[arg-type]

    assert evaluate([parse_condition(text)], response) == [ConditionFailure(text, reason)]


def test_evaluate_returns_only_failed_in_order() -> None:
    conditions = parse_conditions(["status == 503", "status == 200", 'body contains "zzz"'])

    failures = evaluate(conditions, make_response())

    assert [failure.condition for failure in failures] == ["status == 503", 'body contains "zzz"']


def test_invalid_json_fails_json_conditions() -> None:
    conditions = parse_conditions(["json.a == 1", "status == 200", "json.b != 2"])

    failures = evaluate(conditions, make_response(body=b"<html>"))

    assert [failure.condition for failure in failures] == ["json.a == 1", "json.b != 2"]
    assert all(failure.reason.startswith("body is not valid JSON") for failure in failures)


def test_evaluate_deep_nesting_no_raise() -> None:
    depth = 900
    nested = "[" * depth + "]" * depth
    condition = parse_condition(f"json.@ == {nested}")

    failures = evaluate([condition], make_response(body=nested.encode()))

    # Whether 900 levels fit under the recursion limit depends on the Python version.
    assert [failure.reason for failure in failures] in (
        [],
        ["json.@ is nested too deeply to compare"],
    )


def test_condition_failure_str() -> None:
    failure = ConditionFailure("status == 200", "status is 503")

    assert str(failure) == "status == 200 (status is 503)"


def test_json_error_none_when_json_not_needed() -> None:
    response = make_response(body=b"not json")

    evaluate(parse_conditions(["status == 200", 'body contains "not"']), response)

    assert response.json_error is None


def test_json_error_set_after_json_condition() -> None:
    response = make_response(body=b"not json")

    evaluate([parse_condition("json.a == 1")], response)

    assert response.json_error == "Expecting value at line 1 column 1"


def test_json_error_none_for_valid_json() -> None:
    response = make_response()

    evaluate([parse_condition("json.count == 3")], response)

    assert response.json_error is None


def test_json_body_parsed_once() -> None:
    response = make_response(body=b'{"a": [1]}')

    first = response.json_body

    assert first == {"a": [1]}
    assert response.json_body is first


def test_json_body_none_for_invalid_json() -> None:
    response = make_response(body=b"{")

    assert response.json_body is None
    assert response.json_error is not None


def test_text_replaces_invalid_utf8() -> None:
    assert make_response(body=b"a\xffb").text == "a\ufffdb"


def test_header_lookup_joins_repeated_headers() -> None:
    headers = httpx.Headers([("Vary", "Accept"), ("Vary", "Origin")])
    response = ResponseView(200, 1.0, headers, b"")

    assert evaluate([parse_condition('header.vary contains "Origin"')], response) == []


@pytest.mark.parametrize(
    ("status", "passes"),
    [(200, True), (204, True), (299, True), (199, False), (300, False), (503, False)],
)
def test_default_conditions_require_2xx(status: int, passes: bool) -> None:
    failures = evaluate(default_conditions(), make_response(status=status))

    assert (failures == []) is passes


def test_default_conditions_match_constant() -> None:
    assert [condition.text for condition in default_conditions()] == list(DEFAULT_CONDITIONS)


def test_default_conditions_reason_names_status() -> None:
    failures = evaluate(default_conditions(), make_response(status=503))

    assert [str(failure) for failure in failures] == ["status < 300 (status is 503)"]


# --- properties ----------------------------------------------------------------------------

TOKENS = [
    "status",
    "elapsed_ms",
    "body",
    "header.x",
    "header.",
    "json.",
    "json.a",
    "json.a[0]",
    "json.items[?x",
    "'a']",
    "|",
    "length(@)",
    *OPERATORS,
    "200",
    "-1.5",
    '"ok"',
    '"a',
    "ok",
    "true",
    "null",
    "[1,",
    "{}",
    "'q'",
    "`1`",
    "(",
    ")",
    "NaN",
    "\\",
    "\t",
    "",
]


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.text(max_size=80), st.lists(st.sampled_from(TOKENS), max_size=12).map(" ".join))
)
def test_parse_random_text_raises_condition_error(text: str) -> None:
    started = time.monotonic()
    try:
        condition = parse_condition(text)
    except ConditionError as error:
        assert str(error)
    else:
        assert isinstance(condition, Condition)
    assert time.monotonic() - started < 1.0


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from("abxy"), children, max_size=4)
    ),
    max_leaves=20,
)
FUZZ_CONDITIONS = parse_conditions(
    [
        "json.a == 1",
        'json.a != "x"',
        "json.a > 1",
        'json.a <= "m"',
        "json.a contains 1",
        'json.a contains "x"',
        "json.length(@) > 0",
        "json.a[0].b == null",
        'json.@ == [1, {"a": true}]',
        "json.x[?b == `1`] | length(@) >= 1",
        "json.sort(@) == []",
        'body contains "a"',
        "body > 1",
        'header.x contains "1"',
        "header.x >= 1",
        "status < 300",
        "elapsed_ms < 100",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    body=st.one_of(
        JSON_VALUES.map(lambda value: json.dumps(value).encode()), st.binary(max_size=40)
    ),
    header=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=10),
    elapsed_ms=st.floats(allow_nan=False, min_value=0, max_value=1e9),
)
def test_evaluate_random_bodies_never_raises(body: bytes, header: str, elapsed_ms: float) -> None:
    response = make_response(elapsed_ms=elapsed_ms, headers={"X": header}, body=body)

    failures = evaluate(FUZZ_CONDITIONS, response)

    assert all(isinstance(failure, ConditionFailure) and failure.reason for failure in failures)
