"""Actions: what bgapi does when a target's state changes.

An action's ``on`` decides which results fire it:

- ``change`` (default): on becoming down, and on recovering from down to up;
- ``down``: on becoming down;
- ``up``: on recovering from down to up (unknown to up is not a recovery);
- ``always``: on every result.

Actions run as their own tasks on the poller's event loop, so a slow webhook
never delays the next poll, and a failing one is logged and forgotten.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import httpx

from bgapi.config import ActionConfig, TargetConfig
from bgapi.poll import PollResult, format_timestamp
from bgapi.security import signature_headers
from bgapi.state import State, Transition

__all__ = ["build_payload", "run_action", "should_fire"]

logger = logging.getLogger(__name__)

# First retry delay of a webhook; each further retry waits twice as long.
WEBHOOK_BACKOFF_S = 0.5


def should_fire(action: ActionConfig, transition: Transition | None) -> bool:
    """Tell whether ``action`` fires for a result that caused ``transition``."""
    if action.on == "always":
        return True
    if transition is None:
        return False
    if action.on == "down":
        return transition.current is State.DOWN
    if action.on == "up":
        return transition.is_recovery
    return transition.current is State.DOWN or transition.is_recovery


def build_payload(
    target: TargetConfig, state: State, previous_state: State, result: PollResult
) -> dict[str, Any]:
    """Return the JSON document that a webhook action posts."""
    return {
        "target": target.name,
        "state": str(state),
        "previous_state": str(previous_state),
        "sent_at": format_timestamp(time.time()),
        "result": result.to_dict(),
    }


async def run_action(
    action: ActionConfig,
    target: TargetConfig,
    state: State,
    previous_state: State,
    result: PollResult,
    client: httpx.AsyncClient,
) -> None:
    """Perform one action and log its failures.

    Webhook failures (network errors, timeouts, non-2xx statuses) are retried
    and logged, not raised. The caller logs anything else with a traceback.
    """
    if action.type == "log":
        _log_state(target, state, previous_state, result)
        return
    payload = build_payload(target, state, previous_state, result)
    await _post_webhook(action, target, payload, client)


def _log_state(target: TargetConfig, state: State, previous: State, result: PollResult) -> None:
    detail = f"HTTP {result.status_code}" if result.status_code else "no response"
    if result.error:
        detail = f"{detail}: {result.error}"
    level = logging.WARNING if state is State.DOWN else logging.INFO
    logger.log(
        level,
        "target %s is %s (was %s) after %.0f ms, %s",
        target.name,
        state,
        previous,
        result.elapsed_ms,
        detail,
    )


async def _post_webhook(
    action: ActionConfig, target: TargetConfig, payload: dict[str, Any], client: httpx.AsyncClient
) -> None:
    assert action.url is not None, "the config requires a url for webhooks"
    attempts = action.retries + 1
    for attempt in range(1, attempts + 1):
        problem = await _try_post(action, payload, client)
        if problem is None:
            logger.debug("webhook for target %s delivered on attempt %d", target.name, attempt)
            return
        if attempt < attempts:
            delay = WEBHOOK_BACKOFF_S * 2 ** (attempt - 1)
            logger.warning(
                "webhook for target %s failed (%s), attempt %d of %d; retrying in %.1f s",
                target.name,
                problem,
                attempt,
                attempts,
                delay,
            )
            await asyncio.sleep(delay)
        else:
            logger.error(
                "webhook for target %s failed (%s) after %d attempts; giving up",
                target.name,
                problem,
                attempts,
            )


async def _try_post(
    action: ActionConfig, payload: dict[str, Any], client: httpx.AsyncClient
) -> str | None:
    """POST once; return None on a 2xx response, otherwise what went wrong.

    With a ``secret``, each attempt is signed with a fresh timestamp, so a
    retry passes a receiver's freshness check too.
    """
    assert action.url is not None
    # Serialized here, not by httpx, because the signature covers these exact bytes.
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = {"content-type": "application/json", **action.headers}
    if action.secret:
        headers.update(signature_headers(action.secret, body))
    try:
        async with asyncio.timeout(action.timeout):
            # Streamed and never read: only the status matters, and a receiver's
            # body (maybe a compression bomb) must cost nothing.
            request = client.build_request(
                "POST", action.url, content=body, headers=headers, timeout=action.timeout
            )
            response = await client.send(request, stream=True, follow_redirects=False)
            await response.aclose()
    except TimeoutError:
        return f"no answer within {action.timeout:g} s"
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if response.is_success:
        return None
    return f"HTTP {response.status_code}"
