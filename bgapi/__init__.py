"""bgapi: poll HTTP APIs in the background of a FastAPI service and act on the results.

The public names below are imported on first use, so ``import bgapi`` loads
neither FastAPI nor httpx and starts nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from bgapi.background import BackgroundPoller, combine_lifespans, get_poller
    from bgapi.config import ActionConfig, Config, TargetConfig, config_from_dict, load_config
    from bgapi.errors import BgapiError, ConfigError
    from bgapi.jobs import Job, job
    from bgapi.poll import ErrorKind, PollResult
    from bgapi.server import create_app
    from bgapi.state import State, TargetStatus

# Public name -> the module that defines it.
_EXPORTS = {
    "BackgroundPoller": "bgapi.background",
    "combine_lifespans": "bgapi.background",
    "get_poller": "bgapi.background",
    "Job": "bgapi.jobs",
    "job": "bgapi.jobs",
    "Config": "bgapi.config",
    "TargetConfig": "bgapi.config",
    "ActionConfig": "bgapi.config",
    "load_config": "bgapi.config",
    "config_from_dict": "bgapi.config",
    "TargetStatus": "bgapi.state",
    "State": "bgapi.state",
    "PollResult": "bgapi.poll",
    "ErrorKind": "bgapi.poll",
    "BgapiError": "bgapi.errors",
    "ConfigError": "bgapi.errors",
    "create_app": "bgapi.server",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'bgapi' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
