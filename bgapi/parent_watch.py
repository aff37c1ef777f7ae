"""Notice that the parent process has died, for child processes that must not outlive it.

The process mode's poller and the helpers of ``bgapi compare`` use it. On
Linux a child whose parent dies is adopted by another process, so a change
of ``os.getppid()`` means the parent is gone.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

__all__ = ["watch_parent"]


def watch_parent(on_orphaned: Callable[[], object], poll_s: float = 0.5) -> None:
    """Call ``on_orphaned`` once from a daemon thread when the parent process is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        on_orphaned()

    threading.Thread(target=watch, name="bgapi-parent-watch", daemon=True).start()
