"""Logging setup for the command-line interface.

On a terminal every record, uvicorn's included, goes through one rich
handler; elsewhere (CI, systemd, a pipe) plain timestamped lines are written.
Library code only calls ``logging.getLogger(__name__)``; this module is used
by the CLI alone, so importing bgapi never touches logging configuration.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

__all__ = ["RedactingFilter", "setup_logging"]

LEVELS = ("critical", "error", "warning", "info", "debug")


class RedactingFilter(logging.Filter):
    """Replace secrets in every record's final message before it is written."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        super().__init__()
        self._redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self._redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def setup_logging(level: str = "info", redact: Callable[[str], str] | None = None) -> None:
    """Send bgapi's and uvicorn's logs to stderr at ``level``, with secrets masked."""
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        # Markup off: targets' names and error messages may contain brackets.
        handler = RichHandler(
            console=Console(stderr=True), markup=False, rich_tracebacks=True, show_path=False
        )
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    if redact is not None:
        handler.addFilter(RedactingFilter(redact))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # httpx logs every request at INFO; that is the poller's job, at DEBUG.
    logging.getLogger("httpx").setLevel(logging.WARNING)
