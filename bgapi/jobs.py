"""Custom periodic jobs: Python functions that the poller schedules beside HTTP targets.

A :class:`Job` goes through the same machinery as an HTTP target: the same
fixed-rate schedule and missed-slot counting, the same up/down state with
thresholds, the same stored results, actions and API entries. A run succeeds
unless the function raises, returns ``False`` or exceeds the job's timeout.

``async def`` functions are awaited on the poller's event loop. Plain ``def``
functions never run on an event loop: each run gets a daemon worker thread,
in every mode, so a blocking call in a job cannot stall the poller or the API.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any, TypeAlias

from pydantic import ValidationError

from bgapi.config import _NAME_PATTERN, ActionConfig
from bgapi.poll import ErrorKind, PollResult

__all__ = ["Job", "JobFunction", "job"]

logger = logging.getLogger(__name__)

JobFunction: TypeAlias = Callable[[], Any]
"""A function without arguments that returns None, a bool or an awaitable of one."""

# How often a run that finds the job still busy checks again.
BUSY_RECHECK_S = 0.02


class Job:
    """A function that the poller runs at a fixed rate, with a target's state and results.

    Calling the job calls the function, so a decorated function still works
    as before. Build one with :func:`job` or directly.

    Args:
        function: The function to run, ``async def`` or plain ``def``, without arguments.
        interval: Seconds (or a ``timedelta``) between the starts of two runs.
        name: The name shown in the API and stored with each result; the
            function's ``__name__`` when None.
        timeout: Seconds a run may take before it counts as failed; None for no
            limit. An ``async def`` job is cancelled at the timeout. A plain
            ``def`` job cannot be interrupted: its thread goes on, and the next
            run waits for it, so the function never runs twice at once.
        failure_threshold: Consecutive failed runs that make the job ``down``.
        success_threshold: Consecutive successful runs that make it ``up``.
        actions: Actions fired on state changes, as for targets:
            :class:`~bgapi.config.ActionConfig` objects or dicts with the same keys.
        enabled: Schedule the job. A disabled job is listed and runs only on request.

    Raises:
        TypeError: ``function`` is not callable, or an option has the wrong type.
        ValueError: an option is out of range; the message names the job and the value.
    """

    def __init__(
        self,
        function: JobFunction,
        *,
        interval: float | timedelta,
        name: str | None = None,
        timeout: float | timedelta | None = None,
        failure_threshold: int = 1,
        success_threshold: int = 1,
        actions: Iterable[ActionConfig | Mapping[str, Any]] = (),
        enabled: bool = True,
    ) -> None:
        if isinstance(function, Job):
            function = function.function  # re-wrapping a job takes its options anew
        if not callable(function):
            raise TypeError(
                f"a job needs a callable, got {function!r}; decorate a function with @job(interval=...)"
            )
        self.function = function
        self.name = name if name is not None else getattr(function, "__name__", "")
        _check_name(self.name)
        self.interval = _seconds(self.name, "interval", interval)
        self.timeout = None if timeout is None else _seconds(self.name, "timeout", timeout)
        self.failure_threshold = _threshold(self.name, "failure_threshold", failure_threshold)
        self.success_threshold = _threshold(self.name, "success_threshold", success_threshold)
        self.actions = _actions(self.name, actions)
        self.enabled = bool(enabled)
        self.is_async = _is_async(function)
        # Held from the moment a run starts the function until the function
        # returns, in whichever thread that happens.
        self._busy = threading.Lock()
        self._last_error: str | None = None
        # __name__, __doc__ and __wrapped__ of the function, but not its
        # __dict__, whose keys could overwrite the attributes above.
        functools.update_wrapper(self, function, updated=())  # type: ignore[arg-type]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Job(name={self.name!r}, interval={self.interval:g}, async={self.is_async})"

    @property
    def interval_s(self) -> float:
        """Seconds between the starts of two runs."""
        return self.interval

    @property
    def timeout_s(self) -> float | None:
        """Seconds a run may take, or None for no limit."""
        return self.timeout

    async def run(self, scheduled_at: float | None = None) -> PollResult:
        """Run the function once and describe the outcome as a poll result.

        An exception, a ``False`` or a timeout of the function becomes a failed
        result (an exception is logged too). Cancelling the run propagates; a
        ``CancelledError`` that the function raises by itself is a failure.
        """
        start = time.perf_counter()
        result = PollResult.starting(self.name, scheduled_at)
        running = False
        try:
            async with asyncio.timeout(self.timeout) as deadline:
                await self._acquire()
                running = True
                value = await self._call()
        except TimeoutError as exc:
            if not deadline.expired():
                self._fail(result, exc)  # the function itself raised TimeoutError
            elif not running:
                result.error_kind = ErrorKind.TIMEOUT
                result.error = f"the previous run was still going after {self.timeout:g} s"
            else:
                result.error_kind = ErrorKind.TIMEOUT
                result.error = f"the job did not finish within {self.timeout:g} s"
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # the runner is stopping
            # The job's own code raised it (it awaited a future that someone
            # cancelled): a failed run, or the target would stop for good.
            self._fail(result, exc)
        except Exception as exc:  # noqa: BLE001 - any error of the job's own is a failed run
            self._fail(result, exc)
        else:
            if value is False:
                result.error_kind = ErrorKind.CONDITION
                result.error = "the job returned False"
            else:
                result.ok = True
                self._last_error = None
        result.elapsed_ms = (time.perf_counter() - start) * 1000
        return result

    async def _acquire(self) -> None:
        """Take the busy lock, waiting while an earlier run still holds it.

        The enclosing timeout or a cancellation bounds the wait.
        """
        if self._busy.acquire(blocking=False):
            return
        logger.debug("job %s is still running from an earlier run; waiting for it", self.name)
        while not self._busy.acquire(blocking=False):
            await asyncio.sleep(BUSY_RECHECK_S)

    async def _call(self) -> Any:
        """Call the function with the busy lock held; the lock is released when it returns."""
        if not self.is_async:
            return await _call_in_thread(self.function, self._busy, self.name)
        try:
            return await self.function()
        finally:
            self._busy.release()

    def _fail(self, result: PollResult, error: BaseException) -> None:
        message = f"{type(error).__name__}: {error}"
        result.error_kind = ErrorKind.INTERNAL
        result.error = message
        # The traceback once per distinct error; a repeat of the same error gets one line.
        if message != self._last_error:
            logger.error("job %s failed: %s", self.name, message, exc_info=error)
        else:
            logger.warning("job %s failed again: %s", self.name, message)
        self._last_error = message


def job(
    interval: float | timedelta,
    *,
    name: str | None = None,
    timeout: float | timedelta | None = None,
    failure_threshold: int = 1,
    success_threshold: int = 1,
    actions: Iterable[ActionConfig | Mapping[str, Any]] = (),
    enabled: bool = True,
) -> Callable[[JobFunction], Job]:
    """Turn a function into a :class:`Job` that runs every ``interval`` seconds.

    Register the job with ``BackgroundPoller(jobs=[...])`` or
    ``BackgroundPoller.add_job``; ``BackgroundPoller.job`` does both at once.
    The arguments are those of :class:`Job`.

    Example::

        @job(interval=30)
        async def refresh_rates() -> None:
            ...
    """
    if callable(interval) and not isinstance(interval, (int, float, timedelta)):
        raise TypeError(
            f"job() needs an interval, got the function {getattr(interval, '__name__', interval)!r}; "
            "write @job(interval=60) instead of @job"
        )

    def decorate(function: JobFunction) -> Job:
        return Job(
            function,
            interval=interval,
            name=name,
            timeout=timeout,
            failure_threshold=failure_threshold,
            success_threshold=success_threshold,
            actions=actions,
            enabled=enabled,
        )

    return decorate


async def _call_in_thread(function: JobFunction, busy: threading.Lock, name: str) -> Any:
    """Run ``function`` in a new daemon thread and await its outcome.

    A daemon thread, not the loop's default executor: a job that never
    returns must not keep the process alive at shutdown, and the executor's
    threads are joined at exit. ``busy`` is released in the thread once the
    function returns, even after the awaiting run was cancelled or timed out.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(value: Any, error: BaseException | None) -> None:
        if future.done():
            return  # the awaiting run was cancelled or timed out
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)

    def work() -> None:
        value: Any = None
        error: BaseException | None = None
        try:
            value = context.run(function)
            if inspect.isawaitable(value):
                if inspect.iscoroutine(value):
                    value.close()
                error = TypeError(
                    f"job {name!r} returned an awaitable from a plain function; "
                    "declare it with async def so that bgapi awaits it"
                )
        except Exception as exc:  # noqa: BLE001 - delivered to the awaiting run
            error = exc
        except BaseException as exc:  # noqa: BLE001 - SystemExit in a job must not end the poller
            error = RuntimeError(f"job {name!r} raised {type(exc).__name__}: {exc}")
        finally:
            busy.release()
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:
            pass  # the loop closed while the job ran: the poller has stopped

    thread = threading.Thread(target=work, name=f"bgapi-job-{name}", daemon=True)
    try:
        thread.start()
    except BaseException:
        busy.release()
        raise
    return await future


def _is_async(function: JobFunction) -> bool:
    if inspect.iscoroutinefunction(function):
        return True
    call = getattr(function, "__call__", None)  # noqa: B004 - an object with an async __call__
    return inspect.iscoroutinefunction(call)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ValueError(
            f"invalid job name {name!r}: use 1 to 100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit; pass name=... to job()"
        )


def _seconds(name: str, option: str, value: float | timedelta) -> float:
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(
            f"job {name!r}: {option} must be a number of seconds or a timedelta, got {value!r}"
        )
    if not seconds > 0:
        raise ValueError(f"job {name!r}: {option} must be greater than 0 seconds, got {value!r}")
    return seconds


def _threshold(name: str, option: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"job {name!r}: {option} must be a whole number, got {value!r}")
    if value < 1:
        raise ValueError(f"job {name!r}: {option} must be at least 1, got {value!r}")
    return value


def _actions(name: str, actions: Iterable[ActionConfig | Mapping[str, Any]]) -> list[ActionConfig]:
    checked = []
    for index, action in enumerate(actions):
        if isinstance(action, ActionConfig):
            checked.append(action)
            continue
        try:
            checked.append(ActionConfig.model_validate(action))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or 'action'}: {error['msg']}"
                for error in exc.errors()
            )
            raise ValueError(f"job {name!r}: invalid actions[{index}]: {problems}") from None
    return checked
