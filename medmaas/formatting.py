"""Formatting shared by the command-line client and the web pages (static/js/common.js
formats the same way in the browser). Dependency-free, like the rest of the client."""

from __future__ import annotations


def human_duration(seconds: float | None) -> str:
    """12s, 3m 05s, 2h 07m, 3d 4h; an em dash for unknown."""
    if seconds is None:
        return "—"
    s = max(0, round(float(seconds)))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m {s:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h {m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d {h}h"
