"""Alembic revisions of the spawn store (a package, so that every build ships them; Alembic skips this file)."""
