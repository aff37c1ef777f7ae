"""Load and validate a bgapi configuration file.

A configuration is TOML with four parts: ``[server]``, ``[poller]``, ``[store]``
and a list of ``[[targets]]``. :func:`load_config` reads a file, replaces
``${VAR}`` with environment variables and returns a validated :class:`Config`.
Every problem is collected and raised together as one :class:`ConfigError`
whose lines name the file, the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import ipaddress
import os
import json
import re
import ssl
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, quote_plus, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from bgapi.conditions import parse_condition
from bgapi.errors import ConditionError, ConfigError

__all__ = [
    "ActionConfig",
    "Config",
    "PollerConfig",
    "ServerConfig",
    "StoreConfig",
    "TargetConfig",
    "config_from_dict",
    "load_config",
    "mask_headers",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_TOKEN_ENV = "BGAPI_TOKEN"
DEFAULT_MODE = "thread"
DEFAULT_INTERVAL_S = 60.0
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_CONCURRENCY = 100
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_MAX_REDIRECTS = 5
DEFAULT_STORE_PATH = "bgapi.db"
DEFAULT_RETENTION = 1000
DEFAULT_WEBHOOK_TIMEOUT_S = 5.0
DEFAULT_WEBHOOK_RETRIES = 3
# Sub-millisecond intervals only busy-loop; 30 days is longer than anyone polls.
MIN_INTERVAL_S = 0.001
MAX_INTERVAL_S = 30 * 24 * 3600.0
MAX_TIMEOUT_S = 24 * 3600.0
# Below this interval, polling a host other than this machine gets a warning.
MIN_REMOTE_INTERVAL_S = 1.0
# A startup warning that applies to many targets names this many, then counts the rest.
MAX_WARNED_TARGETS = 3

Mode = Literal["thread", "asyncio", "apscheduler", "process"]
MODES: tuple[str, ...] = ("thread", "asyncio", "apscheduler", "process")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

# Header names whose values are credentials: masked wherever bgapi shows them.
SENSITIVE_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key", "x-auth-token"}
)
MASK = "***"
# Shorter substituted values are not masked; see _expand_secrets.
MIN_SECRET_LENGTH = 4

_ENV_PATTERN = re.compile(r"\$\$|\$\{([^}]*)\}")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
_ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_condition(text: str) -> str:
    try:
        parse_condition(text)
    except ConditionError as exc:
        raise ValueError(str(exc)) from None
    return text


ConditionText = Annotated[str, AfterValidator(_check_condition)]


class _Section(BaseModel):
    """A config table: unknown keys are errors, secrets are masked in ``repr``."""

    # strict: TOML has real types, so "80" for a port or "yes" for a boolean
    # is a mistake to report, not a value to convert.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    _secrets: frozenset[str] = PrivateAttr(default=frozenset())

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        redactor = _Redactor(set(self._secrets))
        for name, value in super().__repr_args__():
            if name == "headers" and isinstance(value, dict):
                value = mask_headers(value)
            elif name == "secret" and value is not None:
                value = MASK
            # Conditions, headers and JSON bodies hold strings inside lists and dicts.
            yield name, _redact_nested(value, redactor)


class ServerConfig(_Section):
    """The ``[server]`` section: where the API listens."""

    host: str = DEFAULT_HOST
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    # The name of the variable, not the token: the token never sits in the file.
    token_env: str = DEFAULT_TOKEN_ENV
    # Host names, besides loopback ones, that a loopback API answers to (a
    # reverse proxy that passes its own Host header, for example).
    allowed_hosts: list[str] = Field(default_factory=list)

    _token: str | None = PrivateAttr(default=None)

    @field_validator("token_env")
    @classmethod
    def _check_token_env(cls, name: str) -> str:
        if not _ENV_NAME_PATTERN.match(name):
            raise ValueError(
                "must be the name of an environment variable (letters, digits and '_', "
                'not starting with a digit), e.g. token_env = "BGAPI_TOKEN"'
            )
        return name

    @property
    def token(self) -> str | None:
        """The bearer token that write endpoints require, read from ``token_env``; None if unset."""
        return self._token


class PollerConfig(_Section):
    """The ``[poller]`` section: strategy and defaults for every target."""

    mode: Mode = DEFAULT_MODE
    # TOML allows inf and nan; an infinite interval breaks the slot arithmetic.
    interval: float = Field(
        DEFAULT_INTERVAL_S, ge=MIN_INTERVAL_S, le=MAX_INTERVAL_S, allow_inf_nan=False
    )
    timeout: float = Field(DEFAULT_TIMEOUT_S, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)
    max_concurrency: int = Field(DEFAULT_MAX_CONCURRENCY, ge=1)
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1)
    max_redirects: int = Field(DEFAULT_MAX_REDIRECTS, ge=0)
    # The transport under httpx.AsyncClient: "auto" takes aiohttp when it is
    # installed (several times faster per request), else httpx's own.
    http_client: Literal["auto", "httpx", "aiohttp"] = "auto"
    # Benchmark aid: hold the poller's thread this long after each poll, the way a
    # blocking call inside an `async def` does. Zero in any real configuration.
    blocking_ms: float = Field(0.0, ge=0, le=10_000, allow_inf_nan=False)


    @field_validator("http_client")
    @classmethod
    def _check_http_client(cls, http_client: str) -> str:
        if http_client == "aiohttp" and importlib.util.find_spec("aiohttp") is None:
            raise ValueError(
                'needs the aiohttp package; install it with pip install aiohttp, or set "auto"'
            )
        return http_client


class StoreConfig(_Section):
    """The ``[store]`` section: the SQLite file and how much history it keeps."""

    path: Path = Field(Path(DEFAULT_STORE_PATH), strict=False)
    retention: int = Field(DEFAULT_RETENTION, ge=1)


class ActionConfig(_Section):
    """One ``[[targets.actions]]`` table: what to do when a target's state changes."""

    type: Literal["log", "webhook"]
    on: Literal["change", "down", "up", "always"] = "change"
    url: str | None = None
    timeout: float = Field(DEFAULT_WEBHOOK_TIMEOUT_S, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)
    retries: int = Field(DEFAULT_WEBHOOK_RETRIES, ge=0, le=10)
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        return _check_header_table(headers)
    # Key of the HMAC-SHA256 signature that webhooks carry; masked like a credential.
    secret: str | None = Field(None, min_length=1)

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str | None) -> str | None:
        return None if url is None else _check_http_url(url)

    @model_validator(mode="after")
    def _check_webhook_url(self) -> ActionConfig:
        if self.type == "webhook" and not self.url:
            raise ValueError('a webhook action needs a url, e.g. url = "https://example.com/hook"')
        return self


class TargetConfig(_Section):
    """One ``[[targets]]`` table: an HTTP endpoint to poll and what counts as up."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    name: str
    url: str
    method: str = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | None = None
    json_body: Any = Field(None, alias="json")
    # None means "take the [poller] default"; Config fills both in after validation.
    interval: float | None = Field(
        None, ge=MIN_INTERVAL_S, le=MAX_INTERVAL_S, allow_inf_nan=False
    )
    timeout: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)
    conditions: list[ConditionText] = Field(default_factory=list)
    failure_threshold: int = Field(1, ge=1)
    success_threshold: int = Field(1, ge=1)
    actions: list[ActionConfig] = Field(default_factory=list)
    enabled: bool = True
    follow_redirects: bool = True
    verify: bool = True
    ca_bundle: Path | None = Field(None, strict=False)

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not _NAME_PATTERN.match(name):
            raise ValueError(
                "must be 1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return name

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        return _check_http_url(url)

    @field_validator("ca_bundle")
    @classmethod
    def _check_ca_bundle(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(
                "file not found; give the path of a PEM file of CA certificates, "
                "or remove ca_bundle to use the system's CA store"
            )
        if path is not None:
            try:
                ssl.create_default_context(cafile=str(path))
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"is not a PEM file of CA certificates ({exc})") from None
        return path

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        return _check_header_table(headers)

    @field_validator("json_body")
    @classmethod
    def _check_json_body(cls, body: Any) -> Any:
        try:
            json.dumps(body)
        except (TypeError, ValueError):
            raise ValueError(
                "must be JSON: TOML dates and times have no JSON form, write them as strings"
            ) from None
        return body

    @field_validator("method")
    @classmethod
    def _check_method(cls, method: str) -> str:
        upper = method.upper()
        if upper not in HTTP_METHODS:
            raise ValueError(f"must be one of {', '.join(HTTP_METHODS)}")
        return upper

    @model_validator(mode="after")
    def _check_body(self) -> TargetConfig:
        if self.body is not None and self.json_body is not None:
            raise ValueError("give either body or json, not both")
        return self

    @property
    def interval_s(self) -> float:
        """Seconds between the starts of two polls (the poller default when unset)."""
        assert self.interval is not None, "Config fills in every target's interval"
        return self.interval

    @property
    def timeout_s(self) -> float:
        """Total deadline of one poll in seconds, from connect to the last body byte."""
        assert self.timeout is not None, "Config fills in every target's timeout"
        return self.timeout


class Config(_Section):
    """A validated configuration with every target's defaults filled in."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    poller: PollerConfig = Field(default_factory=PollerConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    targets: list[TargetConfig] = Field(default_factory=list)

    _source: str = PrivateAttr(default="<config>")

    @model_validator(mode="after")
    def _fill_defaults_and_check_names(self) -> Config:
        seen: dict[str, int] = {}
        for index, target in enumerate(self.targets):
            if target.name in seen:
                raise ValueError(
                    f"targets[{index}].name: duplicate target name {target.name!r}, "
                    f"already used by targets[{seen[target.name]}]; give each target a unique name"
                )
            seen[target.name] = index
        filled = [
            target.model_copy(
                update={
                    "interval": target.interval or self.poller.interval,
                    "timeout": target.timeout or self.poller.timeout,
                }
            )
            for target in self.targets
        ]
        object.__setattr__(self, "targets", filled)
        return self

    @property
    def source(self) -> str:
        """The file this configuration was read from, or a placeholder."""
        return self._source

    @property
    def enabled_targets(self) -> list[TargetConfig]:
        """The targets that the poller schedules."""
        return [target for target in self.targets if target.enabled]

    def target(self, name: str) -> TargetConfig | None:
        """Return the target called ``name``, or None."""
        return self._targets_by_name.get(name)

    @functools.cached_property
    def _targets_by_name(self) -> dict[str, TargetConfig]:
        return {target.name: target for target in self.targets}

    def redact(self, text: str) -> str:
        """Replace every secret value that appears in ``text`` with ``***``."""
        if not self._secrets:
            return text
        return _Redactor(set(self._secrets))(text)

    def startup_warnings(self) -> list[str]:
        """Describe settings that are allowed but probably not what the user meant.

        A warning that applies to more than ``MAX_WARNED_TARGETS + 1`` targets
        names the first ``MAX_WARNED_TARGETS`` of them and counts the rest in
        one line. With fewer, every target is named.
        """
        fast: list[str] = []
        slow: list[str] = []
        unverified: list[str] = []
        for target in self.enabled_targets:
            host = urlsplit(target.url).hostname or ""
            if target.interval_s < MIN_REMOTE_INTERVAL_S and not _is_loopback(host):
                fast.append(
                    f"target {target.name!r}: interval {target.interval_s:g} s polls {host} "
                    f"{1 / target.interval_s:.0f} times a second; check that this is intended"
                )
            if target.timeout_s > target.interval_s:
                slow.append(
                    f"target {target.name!r}: timeout {target.timeout_s:g} s is longer than its "
                    f"interval {target.interval_s:g} s, so the slots a slow poll covers are "
                    "skipped and counted as missed"
                )
            if not target.verify:
                unverified.append(
                    f"target {target.name!r}: TLS certificate verification is off (verify = false)"
                )
        return (
            _first_warnings(fast, f"an interval under {MIN_REMOTE_INTERVAL_S:g} s on a remote host")
            + _first_warnings(slow, "a timeout longer than the interval")
            + _first_warnings(unverified, "TLS certificate verification off")
        )


def _first_warnings(warnings: list[str], problem: str) -> list[str]:
    """Keep the first ``MAX_WARNED_TARGETS`` warnings and count the others in one more line.

    One other warning is kept as it is, because a line that counts it would
    be no shorter.
    """
    if len(warnings) <= MAX_WARNED_TARGETS + 1:
        return warnings
    others = len(warnings) - MAX_WARNED_TARGETS
    return [*warnings[:MAX_WARNED_TARGETS], f"{others} more targets have {problem}"]


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, substitute and validate the TOML configuration at ``path``.

    Raises:
        ConfigError: the file is missing, is not valid TOML, names a missing
            environment variable or contains invalid values. Every problem found is
            listed, one per line.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{source}: file not found; pass an existing TOML file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{source}: cannot read the file: {exc}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: {_describe_toml_error(exc)}"]) from None
    return config_from_dict(data, source=source, environ=environ)


def config_from_dict(
    data: Mapping[str, Any],
    source: str = "<config>",
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Validate a configuration given as a dict, as parsed from TOML.

    Raises:
        ConfigError: as for :func:`load_config`.
    """
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    secrets: set[str] = set()
    missing: set[tuple[str | int, ...]] = set()
    substituted = _substitute(data, (), environ, problems, secrets, source, missing)
    _collect_header_secrets(substituted, secrets)
    # Cross-field checks run only once every field is valid, so they are made
    # here too, to report every problem in one run.
    problems.extend(_check_across_fields(substituted, source))
    try:
        config = Config.model_validate(substituted)
    except ValidationError as exc:
        redactor = _Redactor(set(_expand_secrets(secrets)))
        for error in exc.errors():
            loc = tuple(part for part in error["loc"] if not _is_internal_loc(part))
            if loc in missing:  # already reported as an unset variable
                continue
            problems.append(_describe_validation_error(error, substituted, source, redactor))
    if problems:
        # A check made twice (here and by a validator) yields the same line twice.
        raise ConfigError(list(dict.fromkeys(problems)))
    config._source = source
    token = environ.get(config.server.token_env) or None
    config.server._token = token
    if token is not None:
        secrets.add(token)
    config._secrets = _expand_secrets(secrets)
    for target in config.targets:
        target._secrets = config._secrets
        for action in target.actions:
            action._secrets = config._secrets
    return config


def mask_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Return ``headers`` with the values of credential headers replaced by ``***``."""
    return {
        key: MASK if key.lower() in SENSITIVE_HEADERS else value for key, value in headers.items()
    }


def _redact_nested(value: Any, redactor: _Redactor) -> Any:
    """Return ``value`` with secrets masked in every string inside lists, tuples and dicts."""
    if isinstance(value, str):
        return redactor(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_nested(item, redactor) for item in value)
    if isinstance(value, dict):
        return {key: _redact_nested(item, redactor) for key, item in value.items()}
    return value


class _Redactor:
    def __init__(self, secrets: set[str]) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self.secrets = sorted((secret for secret in secrets if secret), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text


def _substitute(
    value: Any,
    path: tuple[str | int, ...],
    environ: Mapping[str, str],
    problems: list[str],
    secrets: set[str],
    source: str,
    missing: set[tuple[str | int, ...]],
) -> Any:
    """Replace ``${VAR}`` in every string of ``value``; ``$$`` is a literal ``$``.

    The key path of each value that names an unset variable goes into ``missing``.
    """
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name = match.group(1)
            if name not in environ:
                problems.append(
                    f"{source}: {_format_path(path)}: environment variable {name!r} is not set; "
                    f"export {name}=... before starting bgapi, or write $$ for a literal $"
                )
                missing.add(path)
                return ""
            secrets.add(environ[name])
            return environ[name]

        return _ENV_PATTERN.sub(replace, value)
    if isinstance(value, Mapping):
        return {
            key: _substitute(item, (*path, key), environ, problems, secrets, source, missing)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [
            _substitute(item, (*path, index), environ, problems, secrets, source, missing)
            for index, item in enumerate(value)
        ]
    return value


def _check_across_fields(data: Any, source: str) -> list[str]:
    """Return the duplicate-name and body-with-json problems of raw config data.

    The lines are the ones the model validators produce, so that duplicates
    of them can be dropped.
    """
    targets = data.get("targets") if isinstance(data, Mapping) else None
    if not isinstance(targets, list):
        return []
    problems = []
    seen: dict[str, int] = {}
    for index, target in enumerate(targets):
        if not isinstance(target, Mapping):
            continue
        name = target.get("name")
        if isinstance(name, str):
            if name in seen:
                problems.append(
                    f"{source}: targets[{index}].name: duplicate target name {name!r}, "
                    f"already used by targets[{seen[name]}]; give each target a unique name"
                )
            else:
                seen[name] = index
        if target.get("body") is not None and target.get("json") is not None:
            where = _format_path(("targets", index), data)
            problems.append(f"{source}: {where}: give either body or json, not both")
    return problems


def _expand_secrets(secrets: set[str]) -> frozenset[str]:
    """Return the secrets worth masking, with the encoded forms they take in URLs.

    Values shorter than :data:`MIN_SECRET_LENGTH` are left out: masking a
    ``${REGION}`` of ``0`` would garble every number in the output.
    """
    expanded: set[str] = set()
    for secret in secrets:
        if len(secret) < MIN_SECRET_LENGTH:
            continue
        expanded.update({secret, quote(secret, safe=""), quote_plus(secret, safe="")})
    return frozenset(expanded)


def _collect_header_secrets(data: Any, secrets: set[str]) -> None:
    """Add the values of credential headers (Authorization, ...) and webhook secrets to ``secrets``."""
    if not isinstance(data, Mapping):
        return
    for target in data.get("targets") or []:
        if not isinstance(target, Mapping):
            continue
        tables = [target, *[a for a in target.get("actions") or [] if isinstance(a, Mapping)]]
        url = target.get("url")
        if isinstance(url, str):
            with contextlib.suppress(ValueError):
                password = urlsplit(url).password
                if password:
                    secrets.add(password)
        for table in tables:
            if isinstance(table.get("secret"), str):
                secrets.add(table["secret"])
            headers = table.get("headers")
            if isinstance(headers, Mapping):
                for key, value in headers.items():
                    if str(key).lower() in SENSITIVE_HEADERS and isinstance(value, str):
                        secrets.add(value)
                        # "Bearer abc" also leaks as "abc" in some messages.
                        secrets.update(part for part in value.split() if len(part) >= 8)


def _describe_toml_error(exc: tomllib.TOMLDecodeError) -> str:
    message = str(exc)
    match = re.search(r"\(at line (\d+), column (\d+)\)", message)
    if match:
        message = message[: match.start()].strip()
        return f"line {match.group(1)}, column {match.group(2)}: invalid TOML: {message}"
    return f"invalid TOML: {message}"


def _format_path(path: tuple[str | int, ...], data: Any = None) -> str:
    """Format ``("targets", 2, "interval")`` as ``targets[2] (name 'api').interval``."""
    text = ""
    node = data
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, Mapping) and isinstance(node.get("name"), str):
                text += f" ({node['name']!r})"
        else:
            text += f".{part}" if text else part
            node = node.get(part) if isinstance(node, Mapping) else None
    return text or "(top level)"


_SECTION_MODELS: dict[tuple[str, ...], type[BaseModel]] = {
    (): Config,
    ("server",): ServerConfig,
    ("poller",): PollerConfig,
    ("store",): StoreConfig,
    ("targets",): TargetConfig,
    ("targets", "actions"): ActionConfig,
}


def _allowed_keys(parent: tuple[str | int, ...]) -> list[str]:
    names = tuple(part for part in parent if isinstance(part, str))
    model = _SECTION_MODELS.get(names)
    if model is None:
        return []
    return [field.alias or name for name, field in model.model_fields.items()]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _describe_validation_error(
    error: Mapping[str, Any], data: Any, source: str, redact: _Redactor
) -> str:
    loc = tuple(part for part in error["loc"] if not _is_internal_loc(part))
    if len(loc) >= 2 and loc[-2] == "headers" and str(loc[-1]).lower() in SENSITIVE_HEADERS:
        error = {**error, "input": MASK}
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    where = _format_path(loc, data)

    if kind == "extra_forbidden":
        key = str(loc[-1])
        allowed = _allowed_keys(loc[:-1])
        where = _format_path(loc[:-1], data)
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(allowed)}"
        return f"{source}: {where}: unknown key {key!r}; {hint}"
    if kind == "missing":
        return f"{source}: {where}: missing required key; add {loc[-1]} = ..."
    if kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
        if message.startswith("targets["):  # cross-field checks name their own path
            return f"{source}: {redact(message)}"
        if isinstance(value, Mapping):  # a check across keys: the table is no help
            return f"{source}: {where}: {redact(message)}"
        return f"{source}: {where}: {redact(message)} (got {redact(_show(value))})"
    fix = ""
    # A value that contains a secret gets no suggestion, which would repeat it.
    if kind in _NUMBER_KINDS and isinstance(value, str) and redact(value) == value:
        fix = _number_fix(str(loc[-1]), value, whole=kind.startswith("int"))
    return f"{source}: {where}: {_describe_kind(kind, ctx, error['msg'])}, got {redact(_show(value))}{fix}"


_NUMBER_KINDS = {"float_type", "float_parsing", "int_type", "int_parsing"}
# Keys whose values are durations in seconds, so that a unit in a quoted value converts.
_SECONDS_KEYS = {"interval", "timeout"}
_SECONDS_PER_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# A longer quoted value gets no suggestion: it is no plausible setting, and
# Python's int() rejects numbers of more than 4,300 digits.
_MAX_SUGGESTED_CHARS = 20


def _number_fix(key: str, value: str, whole: bool) -> str:
    """Suggest the bare number for a quoted one such as "2" or "30s", or return ""."""
    if len(value) > _MAX_SUGGESTED_CHARS:
        return ""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*", value)
    if match is None:
        return ""
    number, unit = match[1], match[2]
    if unit is None:
        if whole and "." in number:
            return ""
        return f"; remove the quotes: {key} = {number}"
    if key not in _SECONDS_KEYS:
        return ""
    seconds = float(number) * _SECONDS_PER_UNIT[unit]
    return f"; write the seconds as a bare number: {key} = {seconds:.15g}"


def _is_internal_loc(part: Any) -> bool:
    # pydantic adds a function name to the location of AfterValidator errors.
    return isinstance(part, str) and part.startswith("function-")


def _describe_kind(kind: str, ctx: Mapping[str, Any], fallback: str) -> str:
    if kind == "greater_than":
        return f"must be greater than {ctx['gt']:g}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx['ge']:g}"
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']:g}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}"
    if kind == "finite_number":
        return "must be a finite number, not inf or nan"
    if kind in {"float_type", "float_parsing", "int_from_float"}:
        return "must be a number" if kind != "int_from_float" else "must be a whole number"
    if kind in {"int_type", "int_parsing"}:
        return "must be a whole number"
    if kind in {"bool_type", "bool_parsing"}:
        return "must be true or false"
    if kind == "string_type":
        return "must be a string in double quotes"
    if kind in {"list_type", "tuple_type"}:
        # Not only conditions: `targets` and `actions` are lists of tables too.
        return "must be a list: a TOML array [...] or repeated [[...]] tables"
    if kind in {"dict_type", "model_type", "model_attributes_type"}:
        return "must be a table"
    return fallback[0].lower() + fallback[1:] if fallback else kind


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_header_table(headers: dict[str, str]) -> dict[str, str]:
    for name, value in headers.items():
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            raise ValueError(f"header name {name!r} is invalid; use letters, digits and '-'")
        if not value.isascii() or "\n" in value or "\r" in value:
            raise ValueError(
                f"header {name!r} must be ASCII on one line; percent-encode or "
                "base64-encode other characters"
            )
    return headers


def _check_http_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"}:
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must include a host, e.g. https://api.example.com/health")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when asked
    except ValueError:
        raise ValueError("has an invalid port; use a number from 1 to 65535") from None
    if not url.isascii() or any(char.isspace() for char in url):
        raise ValueError("must be ASCII without spaces; percent-encode other characters")
    return url
