"""The status page at ``/``: one row per target, rendered on the server.

Plain HTML with every value escaped, no script and no external asset, so it
works offline, behind strict content security policies and in a text browser.
"""

from __future__ import annotations

from html import escape

from bgapi.poll import format_timestamp
from bgapi.state import TargetStatus

__all__ = ["render_status_page"]

# Seconds between automatic reloads of the page.
REFRESH_S = 10

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #1f2328; }
h1 { font-size: 1.4rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .4rem .8rem; border-bottom: 1px solid #d0d7de; white-space: nowrap; }
td:last-child { white-space: normal; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.state { font-weight: 600; border-radius: 1rem; padding: .1rem .6rem; }
.up { background: #dafbe1; color: #116329; }
.down { background: #ffebe9; color: #a40e26; }
.unknown { background: #fff8c5; color: #7d4e00; }
footer { margin-top: 1rem; color: #656d76; font-size: .85rem; }
"""


def render_status_page(statuses: list[TargetStatus], mode: str | None, summary: str) -> str:
    """Return the HTML page for ``statuses``; ``summary`` goes in the footer."""
    rows = "\n".join(_row(status) for status in statuses)
    counts = {state: sum(1 for s in statuses if s.state == state) for state in ("up", "down", "unknown")}
    title = f"{counts['up']} up, {counts['down']} down, {counts['unknown']} unknown"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{REFRESH_S}">
<title>bgapi: {escape(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>bgapi status: <span id="summary">{escape(title)}</span></h1>
<table id="targets">
<thead><tr><th>Target</th><th>State</th><th>HTTP</th><th>Time</th><th>Last poll (UTC)</th><th>Detail</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
<footer>Mode: {escape(mode or "no poller")}. {escape(summary)} This page reloads every {REFRESH_S} s.
JSON: <a href="/api/targets">/api/targets</a>, metrics: <a href="/metrics">/metrics</a>, API docs: <a href="/docs">/docs</a>.</footer>
</body>
</html>
"""


def _row(status: TargetStatus) -> str:
    result = status.last_result
    state = str(status.state)
    code = str(result.status_code) if result and result.status_code else "-"
    elapsed = f"{result.elapsed_ms:.0f} ms" if result else "-"
    polled = format_timestamp(result.started_at)[:19].replace("T", " ") if result else "never"
    detail = ""
    if result is not None and not result.ok:
        detail = "; ".join(result.failed_conditions) or f"{result.error_kind}: {result.error}"
    return (
        f'<tr data-target="{escape(status.name)}"><td>{escape(status.name)}</td>'
        f'<td><span class="state {state}">{state}</span></td>'
        f'<td class="num">{escape(code)}</td><td class="num">{escape(elapsed)}</td>'
        f"<td>{escape(polled)}</td><td>{escape(detail)}</td></tr>"
    )
