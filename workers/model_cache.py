"""Loaded models kept per worker process (bounded LRU), so repeated calls don't reload.

A model whose bundle directory is gone was erased (DELETE of its version or model): its
entry is dropped at the next call, so its weights leave memory and are never served again."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from app import artifacts

_lock = threading.Lock()
_cache: OrderedDict[tuple[Path, str, str], Any] = OrderedDict()
stats = {"hits": 0, "loads": 0}


def _drop_erased() -> None:
    """Forget models whose bundle directory no longer exists (call with the lock held)."""
    for key in [k for k in _cache if not artifacts.still_exists(k[0])]:
        del _cache[key]


def get_predictor(bundle_dir: Path, capacity: int, device: str = "auto", backend: str = "auto") -> Any:
    """The bundle's Predictor on `device` with `backend` (Settings.scoring_backend), loaded once."""
    from workers.ml.predict import Predictor

    key = (Path(bundle_dir), device, backend)
    with _lock:
        _drop_erased()
        if key in _cache:
            _cache.move_to_end(key)
            stats["hits"] += 1
            return _cache[key]
    predictor = Predictor.from_bundle(bundle_dir, device=device, backend=backend)  # outside the lock: loads can be slow
    with _lock:
        stats["loads"] += 1
        _cache[key] = predictor
        _cache.move_to_end(key)
        while len(_cache) > max(1, capacity):
            _cache.popitem(last=False)
    return predictor


def cached(bundle_dir: Path) -> bool:
    """Whether a model from this bundle directory is loaded (on any device)."""
    with _lock:
        return any(k[0] == Path(bundle_dir) for k in _cache)


def clear() -> None:
    with _lock:
        _cache.clear()
