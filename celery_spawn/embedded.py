"""The server-less broker's former home: :mod:`celery_spawn.transport.spawnfs` (kept so existing imports work)."""
from __future__ import annotations

from .transport.spawnfs import PARTIAL_SUFFIX, SCHEME, Channel, Transport, folder_options

__all__ = ["PARTIAL_SUFFIX", "SCHEME", "Channel", "Transport", "folder_options"]
