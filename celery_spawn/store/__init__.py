"""The SQL lineage store: tables, engine handling, writes and migrations."""
from .sql import SpawnStore

__all__ = ["SpawnStore"]
