"""The adapter of each destination kind, imported on first use."""

from __future__ import annotations

import importlib
import threading

from audiences.destinations.base import Adapter

__all__ = ["adapter_for", "has_adapter"]

#: kind → (module, class).
_ADAPTERS: dict[str, tuple[str, str]] = {
    "META_CONVERSIONS": ("audiences.destinations.meta", "MetaConversionsAdapter"),
    "META_CUSTOM_AUDIENCE": ("audiences.destinations.meta", "MetaCustomAudienceAdapter"),
    "GOOGLE_ADS_CONVERSIONS": ("audiences.destinations.google", "GoogleAdsConversionsAdapter"),
    "GOOGLE_DATA_MANAGER_AUDIENCE": ("audiences.destinations.google", "GoogleDataManagerAudienceAdapter"),
    "TIKTOK_EVENTS": ("audiences.destinations.tiktok", "TikTokEventsAdapter"),
    "TIKTOK_AUDIENCE": ("audiences.destinations.tiktok", "TikTokAudienceAdapter"),
    "POSTHOG_TRAITS": ("audiences.destinations.posthog", "PostHogTraitsAdapter"),
    "HEAP_TRAITS": ("audiences.destinations.heap", "HeapTraitsAdapter"),
}
_loaded: dict[str, Adapter] = {}
_lock = threading.Lock()


def has_adapter(kind: str) -> bool:
    return kind in _ADAPTERS


def adapter_for(kind: str) -> Adapter:
    """The adapter for ``kind``; ``KeyError`` when the kind has none yet."""
    adapter = _loaded.get(kind)
    if adapter is None:
        module_name, class_name = _ADAPTERS[kind]
        with _lock:
            adapter = _loaded.get(kind)
            if adapter is None:
                adapter = getattr(importlib.import_module(module_name), class_name)()
                _loaded[kind] = adapter
    return adapter
