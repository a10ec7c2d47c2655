"""Shared types of the ingestion package: the report, the limits, option parsing."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, overload

from .errors import IngestError

GiB = 1 << 30
MiB = 1 << 20
# Fewer valid rows than this cannot be trained on with the default 0.8/0.1/0.1 split (the
# train submit check, app/modelconfig.py, wants 8 training rows plus 1 each for val and
# test): such an upload is accepted with a warning, and a train job on it is refused.
MIN_DATASET_ROWS = 10


@dataclass
class IngestReport:
    rows: int  # valid rows (images: all splits together)
    invalid_rows: int
    invalid_samples: list[dict[str, Any]]  # at most IngestLimits.max_invalid_samples
    schema: dict[str, Any]
    stats: dict[str, Any]
    data_path: str | None  # normalised file written under work_dir, None for libraries
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class IngestLimits:
    max_members: int = 200_000  # entries in a zip
    max_bytes: int = 20 * GiB  # uncompressed bytes of a zip, npz or gzip stream
    max_ratio: float = 200.0  # per-member compression ratio of a zip
    ratio_min_bytes: int = 1 * MiB  # members smaller than this skip the ratio check
    max_image_pixels: int = 64_000_000  # width*height of one source image
    max_output_bytes: int = 8 * GiB  # the normalised uint8 image tensor
    max_line_bytes: int = 1 * MiB  # one line of a text file
    max_invalid_samples: int = 20

    @classmethod
    def of(cls, limits: IngestLimits | Mapping[str, Any] | None) -> IngestLimits:
        if limits is None:
            return cls()
        if isinstance(limits, IngestLimits):
            return limits
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(limits) - names
        if unknown:
            raise ValueError(f"unknown ingest limits: {sorted(unknown)}")
        return cls(**dict(limits))


class InvalidRows:
    """Counts invalid rows, keeps the first few as samples and a histogram of reasons."""

    def __init__(self, max_samples: int = 20) -> None:
        self.count = 0
        self.samples: list[dict[str, Any]] = []
        self.reasons: Counter[str] = Counter()
        self._max = max_samples

    def add(self, reason: str, **where: Any) -> None:
        self.count += 1
        # the part before the first ':' names the kind of problem, e.g. "SMILES parse error"
        self.reasons[reason.split(":", 1)[0]] += 1
        if len(self.samples) < self._max:
            self.samples.append({**where, "reason": reason})


# -- options -----------------------------------------------------------------
# Options arrive from multipart form fields (strings) or JSON (typed); accept both.


def check_option_names(options: Mapping[str, Any], allowed: Iterable[str], kind: str) -> None:
    allowed = sorted(allowed)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise IngestError(
            "unknown_option",
            f"unknown option{'s' if len(unknown) > 1 else ''} for {kind} datasets: "
            f"{', '.join(unknown)}; valid options are: {', '.join(allowed)}",
            {"unknown": unknown, "allowed": allowed},
        )


@overload
def opt_str(options: Mapping[str, Any], name: str, default: str, choices: Iterable[str] | None = None) -> str: ...


@overload
def opt_str(
    options: Mapping[str, Any], name: str, default: str | None, choices: Iterable[str] | None = None
) -> str | None: ...


def opt_str(
    options: Mapping[str, Any], name: str, default: str | None, choices: Iterable[str] | None = None
) -> str | None:
    value = options.get(name)
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return default
    if not isinstance(value, str):
        raise IngestError("invalid_option", f"option {name} must be a string, got {value!r}")
    value = value.strip()
    if choices is not None and value not in choices:
        raise IngestError("invalid_option", f"option {name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def opt_int(options: Mapping[str, Any], name: str, default: int, minimum: int = 1, maximum: int | None = None) -> int:
    value = options.get(name)
    if value is None or value == "":
        return default
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        number = int(value)
    except (TypeError, ValueError):
        raise IngestError("invalid_option", f"option {name} must be an integer, got {value!r}") from None
    if number < minimum or (maximum is not None and number > maximum):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise IngestError("invalid_option", f"option {name} must be {bounds}, got {number}")
    return number


def opt_list(options: Mapping[str, Any], name: str) -> list[str] | None:
    """A list of names, given as a JSON list or a comma-separated string."""
    value = options.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise IngestError("invalid_option", f"option {name} must be a list of names or a comma-separated string")
    if any(not v for v in items):
        raise IngestError("invalid_option", f"option {name} contains an empty name: {value!r}")
    if len(set(items)) != len(items):
        raise IngestError("invalid_option", f"option {name} names a column twice: {value!r}")
    return items


def resolve_column(header: list[str], name: str, explicit: bool) -> str | None:
    """The header's name for a column: exact, or for a default name (not one the user typed)
    a unique case-insensitive match, so 'SMILES' or 'Smiles' work without options."""
    if name in header:
        return name
    if not explicit:
        matches = [h for h in header if h.lower() == name.lower()]
        if len(matches) == 1:
            return matches[0]
    return None
