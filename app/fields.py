"""Marshmallow fields for JSON request bodies that take JSON's types as documented.

marshmallow's own number and boolean fields coerce: "10" or 10.0 become an integer, "1.5"
a float, 1 or "yes" a boolean (and True is an integer). The OpenAPI document says integer,
number and boolean, so a body with a string or a boolean in a number's place is refused
(422) rather than read loosely. Query strings are text and keep marshmallow's fields."""

from __future__ import annotations

from typing import Any

from marshmallow import fields


class StrictInteger(fields.Integer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, bool):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class StrictFloat(fields.Float):
    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class StrictBoolean(fields.Boolean):
    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value
