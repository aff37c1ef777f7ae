"""Parse condition strings and evaluate them against HTTP responses.

A condition is ``SUBJECT OPERATOR VALUE`` with whitespace around the operator:

    status == 200
    elapsed_ms < 2000
    json.status.indicator == "none"
    json.items[?state == 'up'] | length(@) > 0
    header.content-type contains "json"
    body contains "ok"

SUBJECT is ``status``, ``elapsed_ms``, ``body``, ``header.<name>`` or
``json.<JMESPath>``. VALUE is a JSON literal, so strings need double quotes.
Conditions are parsed once when the configuration loads and never evaluated
with ``eval``.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import jmespath
from jmespath import exceptions as jmespath_errors
from jmespath.functions import Functions
from jmespath.parser import ParsedResult

from bgapi.errors import ConditionError

__all__ = [
    "DEFAULT_CONDITIONS",
    "MAX_CONDITION_LENGTH",
    "OPERATORS",
    "Condition",
    "ConditionFailure",
    "ResponseView",
    "default_conditions",
    "evaluate",
    "parse_condition",
    "parse_conditions",
]

OPERATORS: tuple[str, ...] = ("==", "!=", "<", "<=", ">", ">=", "contains")
_ORDERING_OPERATORS = frozenset({"<", "<=", ">", ">="})
DEFAULT_CONDITIONS: tuple[str, ...] = ("status >= 200", "status < 300")
# Bounds parse time, because each operator token in the text is a candidate split to try.
MAX_CONDITION_LENGTH = 2000

_SUBJECT_HINTS = ("status", "elapsed_ms", "body", "header.<name>", "json.<JMESPath>")
# An operator counts only with whitespace (or the end of the text) on both sides.
_OPERATOR_TOKEN = re.compile(r"(?:(?<=\s)|^)(==|!=|<=|>=|<|>|contains)(?=\s|$)")
# A header field name is a token of tchar characters (RFC 9110, sections 5.1 and 5.6.2).
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_MAX_SHOWN = 60
_UNPARSED = object()


@dataclass(frozen=True, slots=True)
class Condition:
    """A parsed condition, ready for `evaluate`."""

    text: str
    subject: str
    path: str | None
    operator: str
    expected: object
    _expression: ParsedResult | None = field(default=None, compare=False, repr=False)

    @property
    def needs_json(self) -> bool:
        """Whether evaluating the condition parses the body as JSON."""
        return self.subject == "json"

    @property
    def label(self) -> str:
        """Subject as failure reasons name it, e.g. ``json.a.b`` or ``header etag``."""
        if self.subject == "json":
            return f"json.{self.path}"
        if self.subject == "header":
            return f"header {self.path}"
        return self.subject


@dataclass(frozen=True, slots=True)
class ConditionFailure:
    """A condition that failed, and the reason."""

    condition: str
    reason: str

    def __str__(self) -> str:
        return f"{self.condition} ({self.reason})"


@dataclass(slots=True)
class ResponseView:
    """The parts of an HTTP response that conditions read.

    ``headers`` must look names up case-insensitively, as ``httpx.Headers`` does.
    The text and the parsed JSON are computed on first use and cached.
    """

    status_code: int
    elapsed_ms: float
    headers: Mapping[str, str]
    body: bytes
    _text: str | None = field(default=None, init=False, repr=False)
    _json: object = field(default=_UNPARSED, init=False, repr=False)
    _json_error: str | None = field(default=None, init=False, repr=False)

    @property
    def text(self) -> str:
        """Body decoded as UTF-8, with U+FFFD in place of invalid bytes."""
        if self._text is None:
            self._text = self.body.decode("utf-8", errors="replace")
        return self._text

    @property
    def json_body(self) -> object:
        """Body parsed as JSON, or None when it is not valid JSON (see `json_error`)."""
        if self._json is _UNPARSED:
            self._json = None
            try:
                self._json = json.loads(self.body)
            except json.JSONDecodeError as error:
                self._json_error = _describe_decode_error(error)
            except UnicodeDecodeError as error:
                self._json_error = f"invalid {error.encoding} at byte {error.start}: {error.reason}"
            except ValueError as error:
                # For example "Exceeds the limit (4300 digits) for integer string conversion: ...".
                self._json_error = str(error).split(":")[0]
            except RecursionError:
                self._json_error = "nested too deeply"
        return self._json

    @property
    def json_error(self) -> str | None:
        """Why the body is not valid JSON, or None if it parsed or was never parsed."""
        return self._json_error


def parse_condition(text: str) -> Condition:
    """Parse one condition string.

    Operator tokens may also occur inside the JMESPath or the quoted value, so
    each token is tried as the split point from the rightmost to the leftmost.
    The first split whose subject is valid and whose value is a JSON literal wins.

    Raises:
        ConditionError: The text does not parse, or its value does not suit its
            subject and operator. The message quotes the condition and the fix.
    """
    if not isinstance(text, str):
        raise ConditionError(
            f"invalid condition {text!r}: it must be a string, not {type(text).__name__}"
        )
    text = text.strip()
    if not text:
        raise ConditionError(
            "invalid condition '': it is empty. Write SUBJECT OPERATOR VALUE, e.g. 'status == 200'"
        )
    if len(text) > MAX_CONDITION_LENGTH:
        raise ConditionError(
            f"invalid condition '{text[:40]}...': it has {len(text)} characters, "
            f"more than the maximum of {MAX_CONDITION_LENGTH}. Shorten it"
        )

    subject_errors: list[str] = []
    value_errors: list[str] = []
    for match in reversed(list(_OPERATOR_TOKEN.finditer(text))):
        subject_text, value_text = text[: match.start()].strip(), text[match.end() :].strip()
        try:
            subject, path, expression = _parse_subject(subject_text)
        except ConditionError as error:
            subject_errors.append(str(error))
            continue
        try:
            expected = _parse_value(value_text)
        except ConditionError as error:
            value_errors.append(str(error))
            continue
        condition = Condition(text, subject, path, match.group(1), expected, expression)
        problem = _check_types(condition)
        if problem:
            raise ConditionError(f"invalid condition '{text}': {problem}")
        return condition

    if not subject_errors and not value_errors:
        raise ConditionError(
            f"invalid condition '{text}': no operator found. Put one of {', '.join(OPERATORS)} "
            "between the subject and the value, with spaces around it"
        )
    # Report the value error of a split whose subject parsed, since that split is the likeliest
    # one intended. Otherwise report the leftmost split, whose subject is the shortest.
    problem = value_errors[0] if value_errors else subject_errors[-1]
    raise ConditionError(f"invalid condition '{text}': {problem}")


def parse_conditions(texts: Iterable[str]) -> list[Condition]:
    """Parse condition strings in order.

    Raises:
        ConditionError: For the first string that does not parse.
    """
    return [parse_condition(text) for text in texts]


def default_conditions() -> list[Condition]:
    """Return the conditions for a target that gives none: a 2xx status."""
    return parse_conditions(DEFAULT_CONDITIONS)


def _parse_subject(text: str) -> tuple[str, str | None, ParsedResult | None]:
    if text in ("status", "elapsed_ms", "body"):
        return text, None, None
    if text == "header" or text.startswith("header."):
        name = text.removeprefix("header").removeprefix(".")
        if not name:
            raise ConditionError(
                "header. needs a header name after the dot, e.g. header.content-type"
            )
        if not _HEADER_NAME.fullmatch(name):
            raise ConditionError(
                f"'{name}' is not a valid header name. Use letters, digits and !#$%&'*+-.^_`|~"
            )
        return "header", name.lower(), None
    if text == "json" or text.startswith("json."):
        path = text.removeprefix("json").removeprefix(".")
        if not path:
            raise ConditionError(
                "json. needs a JMESPath expression after the dot, e.g. json.status.indicator, "
                "or json.@ for the whole body"
            )
        return "json", path, _compile_jmespath(path)
    if not text:
        raise ConditionError(
            "the subject is missing. Write it before the operator, e.g. 'status == 200'"
        )
    head = text.split(".")[0]
    guess = difflib.get_close_matches(head, ["status", "elapsed_ms", "body", "header", "json"], n=1)
    hint = f"Did you mean '{guess[0]}{text[len(head) :]}'? " if guess else ""
    raise ConditionError(
        f"unknown subject '{text}'. {hint}Subjects are: {', '.join(_SUBJECT_HINTS)}"
    )


def _compile_jmespath(path: str) -> ParsedResult:
    try:
        expression = jmespath.compile(path)
    except jmespath_errors.IncompleteExpressionError:
        reason = "the expression is incomplete"
    except jmespath_errors.LexerError as error:
        reason = f"{error.message} at column {error.lexer_position}"
    except jmespath_errors.ParseError as error:
        reason = f"{error.msg} at column {error.lex_position}"
    except (ValueError, RecursionError) as error:
        reason = str(error) or "it is nested too deeply"
    else:
        _check_functions(path, expression)
        return expression
    raise ConditionError(
        f"JMESPath '{path}' does not compile: {reason}. Fix the expression after 'json.'"
    )


def _check_functions(path: str, expression: ParsedResult) -> None:
    # jmespath reports an unknown function or a wrong argument count only when the call is
    # reached during a search, so check every call in the syntax tree now.
    # NOTE: FUNCTION_TABLE is filled from the _func_* methods in jmespath 1.1.0, and a later
    # version could rename it.
    table = Functions().FUNCTION_TABLE
    nodes = [expression.parsed]
    while nodes:
        node = nodes.pop()
        # Slices have None among their children (an omitted start, stop or step).
        nodes.extend(child for child in node.get("children", []) if isinstance(child, dict))
        if node.get("type") != "function_expression":
            continue
        name, count = node["value"], len(node["children"])
        if name not in table:
            guess = difflib.get_close_matches(name, list(table), n=1)
            hint = f" Did you mean {guess[0]}()?" if guess else ""
            raise ConditionError(f"JMESPath '{path}' calls unknown function {name}().{hint}")
        signature = table[name]["signature"]
        variadic = any(argument.get("variadic") for argument in signature)
        if count < len(signature) or (count > len(signature) and not variadic):
            raise ConditionError(
                f"JMESPath '{path}' calls {name}() with {count} arguments, "
                f"but it takes {len(signature)}{' or more' if variadic else ''}"
            )


def _parse_value(text: str) -> object:
    if not text:
        raise ConditionError(
            'the value is missing. Write a JSON literal after the operator, e.g. 200 or "ok"'
        )
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        if text.startswith('"'):
            raise ConditionError(
                f"value '{text}' is not valid JSON: {_describe_decode_error(error)}. "
                "Check its quotes and escapes"
            ) from None
    except (ValueError, RecursionError):
        pass
    if len(text) >= 2 and text[0] == text[-1] == "'":
        raise ConditionError(
            f"value {text} uses single quotes, which JSON does not allow. "
            f"Write strings in double quotes: {json.dumps(text[1:-1])}"
        )
    raise ConditionError(
        f"value '{text}' is not a JSON literal. Write strings in double quotes: {json.dumps(text)}"
    )


def _describe_decode_error(error: json.JSONDecodeError) -> str:
    # Some messages end in "at", e.g. "Unterminated string starting at".
    return f"{error.msg.removesuffix(' at')} at line {error.lineno} column {error.colno}"


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _check_types(condition: Condition) -> str | None:
    """Return why the value does not suit the subject and operator, or None if it does."""
    subject, operator, expected = condition.subject, condition.operator, condition.expected
    expected_json = _render(expected)
    if subject in ("status", "elapsed_ms"):
        if operator == "contains":
            return f"contains does not apply to {subject}, which is a number. Use ==, !=, <, <=, > or >="
        if not _is_number(expected):
            fix = f" Write it without quotes: {expected}" if _is_number_text(expected) else ""
            return f"{subject} needs a number value, got {expected_json}.{fix}"
    elif subject in ("body", "header"):
        subject_name = "body" if subject == "body" else "a header"
        if operator == "contains" and not isinstance(expected, str):
            return f"contains on {subject_name} needs a string value, got {expected_json}. Write it in double quotes: {json.dumps(expected_json)}"
        if operator in _ORDERING_OPERATORS and not _is_number(expected):
            return f"{operator} on {subject_name} needs a number value, got {expected_json}"
        null_ok = subject == "header"  # `header.x == null` checks that the header is absent.
        if not (
            isinstance(expected, str) or _is_number(expected) or (expected is None and null_ok)
        ):
            allowed = "a string, a number or null" if null_ok else "a string or a number"
            return f"{condition.label} can only be compared with {allowed}, got {expected_json}"
    elif operator in _ORDERING_OPERATORS and not (
        _is_number(expected) or isinstance(expected, str)
    ):
        return f"{operator} needs a number or a string value, got {expected_json}"
    return None


def evaluate(conditions: Sequence[Condition], response: ResponseView) -> list[ConditionFailure]:
    """Evaluate conditions against a response and return those that failed.

    The result is empty when every condition holds. No response content raises:
    invalid JSON, missing fields and type mismatches become failures with a reason.
    """
    failures = []
    for condition in conditions:
        try:
            reason = _failure_reason(condition, response)
        except RecursionError:  # From jmespath or _json_equal on deeply nested JSON.
            reason = f"{condition.label} is nested too deeply to compare"
        if reason is not None:
            failures.append(ConditionFailure(condition.text, reason))
    return failures


def _failure_reason(condition: Condition, response: ResponseView) -> str | None:
    label, operator, expected = condition.label, condition.operator, condition.expected
    actual: object
    if condition.subject == "status":
        actual = response.status_code
    elif condition.subject == "elapsed_ms":
        actual = response.elapsed_ms
    elif condition.subject == "json":
        document = response.json_body
        if response.json_error is not None:
            return f"body is not valid JSON: {response.json_error}"
        assert condition._expression is not None
        try:
            actual = condition._expression.search(document)
        except jmespath_errors.JMESPathError as error:
            return f"{label} failed: {error}"
    else:
        actual = (
            response.text
            if condition.subject == "body"
            else response.headers.get(condition.path or "")
        )
        # A missing header compares like a JSON null, so `!= "a"` and `== null` pass.
        if actual is None and operator not in ("==", "!="):
            return f"{label} is missing"
        if actual is not None and _is_number(expected):
            number = _text_to_number(actual)
            if number is None:
                return f"{label} is {_render(actual)}, not a number"
            actual = number

    if operator == "contains":
        return _contains_reason(label, actual, expected)
    if operator in ("==", "!="):
        if _json_equal(actual, expected) == (operator == "=="):
            return None
        return f"{label} is {_describe(actual, condition.subject)}"
    if _is_number(expected) and not _is_number(actual):
        return f"{label} is {_json_type(actual)}, not a number"
    if isinstance(expected, str) and not isinstance(actual, str):
        return f"{label} is {_json_type(actual)}, not a string"
    if _compare(actual, operator, expected):
        return None
    return f"{label} is {_describe(actual, condition.subject)}"


def _contains_reason(label: str, actual: object, expected: object) -> str | None:
    if isinstance(actual, str):
        if not isinstance(expected, str):
            return f"{label} is a string, so the value to find must be a string, not {_json_type(expected)}"
        found = expected in actual
    elif isinstance(actual, list):
        found = any(_json_equal(item, expected) for item in actual)
    else:
        return f"{label} is {_json_type(actual)}, not a string or an array"
    return None if found else f"{label} does not contain {_render(expected)}"


def _compare(actual: object, operator: str, expected: object) -> bool:
    # Both sides are numbers or both are strings, as the callers check.
    if operator == "<":
        return actual < expected  # type: ignore[operator]
    if operator == "<=":
        return actual <= expected  # type: ignore[operator]
    if operator == ">":
        return actual > expected  # type: ignore[operator]
    return actual >= expected  # type: ignore[operator]


def _json_equal(left: object, right: object) -> bool:
    """Compare as JSON does: 1 equals 1.0, but true does not equal 1."""
    if isinstance(left, bool) or isinstance(right, bool):
        return left is right
    if _is_number(left) and _is_number(right):
        return left == right
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(_json_equal, left, right))
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(
            _json_equal(left[key], right[key]) for key in left
        )
    return type(left) is type(right) and left == right


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_number_text(value: object) -> bool:
    return isinstance(value, str) and _text_to_number(value) is not None


def _text_to_number(text: object) -> int | float | None:
    """Parse a JSON number from text such as a header value, or return None."""
    if not isinstance(text, str) or not _JSON_NUMBER.fullmatch(text.strip()):
        return None
    text = text.strip()
    try:
        return int(text)
    except ValueError:  # A fraction, an exponent, or more digits than int() accepts.
        return float(text)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if _is_number(value):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _describe(actual: object, subject: str) -> str:
    """Format an actual value for a failure reason."""
    if subject == "header" and actual is None:
        return "missing"
    if subject == "elapsed_ms" and isinstance(actual, float):
        return _render(round(actual, 1))
    return _render(actual)


def _render(value: object) -> str:
    """Format a value as JSON for a message, cut to about 60 characters."""
    if isinstance(value, str):
        value = value[:_MAX_SHOWN]  # Spares encoding a whole body only to cut it.
    try:
        shown = json.dumps(value, ensure_ascii=False)
    except RecursionError:
        shown = _json_type(value)
    return shown if len(shown) <= _MAX_SHOWN else shown[: _MAX_SHOWN - 3] + "..."
