"""Logging setup for the command-line interface.

On a terminal every record, uvicorn's included, goes through one rich
handler; elsewhere (CI, systemd, a pipe) plain timestamped lines are written.
Library code only calls ``logging.getLogger(__name__)``; this module is used
by the CLI alone, so importing bgapi never touches logging configuration.
"""

from __future__ import annotations

import logging
import sys
import traceback
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
        if record.exc_info and record.exc_info[0] is not None:
            self._redact_traceback(record)
        return True

    def _redact_traceback(self, record: logging.LogRecord) -> None:
        # An exception's message may hold a secret (a URL with a token). When
        # it does, the traceback becomes plain text in the message, because
        # handlers such as RichHandler render exc_info themselves.
        assert record.exc_info is not None
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        redacted = self._redact(text)
        if redacted != text:
            record.msg, record.args = f"{record.getMessage()}\n{redacted}", None
            record.exc_info, record.exc_text = None, None


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
    # APScheduler 3 logs every job run at INFO; bgapi logs its own polls at DEBUG.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
