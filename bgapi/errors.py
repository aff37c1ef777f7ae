"""Exceptions raised by bgapi.

    BgapiError
    ├── ConfigError         a configuration file or value is invalid
    ├── ConditionError      a condition string does not parse
    ├── StoreError          the SQLite store cannot be opened or written
    └── RunnerError         a runner was started or stopped in the wrong state

Only the command-line interface turns these into exit codes.
"""

from __future__ import annotations

__all__ = ["BgapiError", "ConditionError", "ConfigError", "RunnerError", "StoreError"]


class BgapiError(Exception):
    """Base class of every error that bgapi raises on purpose."""


class ConfigError(BgapiError):
    """One or more problems in a configuration.

    Each problem is a full line: where (file and key path), the bad value and
    what is allowed.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ConditionError(BgapiError):
    """A condition string that does not parse or whose JMESPath does not compile."""


class StoreError(BgapiError):
    """The result store cannot be opened or written."""


class RunnerError(BgapiError):
    """A runner was asked to do something its current run state does not allow."""
