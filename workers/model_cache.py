"""Loaded models kept per worker process (bounded LRU), so repeated calls don't reload."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

_lock = threading.Lock()
_cache: OrderedDict[str, Any] = OrderedDict()
stats = {"hits": 0, "loads": 0}


def get_predictor(bundle_dir: Path, capacity: int, device: str = "auto") -> Any:
    from workers.ml.predict import Predictor

    key = f"{bundle_dir}|{device}"
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            stats["hits"] += 1
            return _cache[key]
    predictor = Predictor.from_bundle(bundle_dir, device=device)  # outside the lock: loads can be slow
    with _lock:
        stats["loads"] += 1
        _cache[key] = predictor
        _cache.move_to_end(key)
        while len(_cache) > max(1, capacity):
            _cache.popitem(last=False)
    return predictor


def clear() -> None:
    with _lock:
        _cache.clear()
