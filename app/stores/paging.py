"""Keyset paging by id, newest first (the `cursor` / `next_cursor` of every list endpoint)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select
from sqlalchemy.orm import Session


def cursor_page(
    session: Session, query: Select, id_column: Any, limit: int, cursor: int | None = None
) -> dict[str, Any]:
    """{"items": at most `limit` rows with id below `cursor`, newest first; "next_cursor":
    the last item's id when there are more, else None}."""
    if cursor is not None:
        query = query.where(id_column < cursor)
    items = list(session.scalars(query.order_by(id_column.desc()).limit(limit + 1)).all())
    more = len(items) > limit
    items = items[:limit]
    return {"items": items, "next_cursor": items[-1].id if more and items else None}
