"""One exception tree for everything celery-spawn raises.

Catch :class:`SpawnError` for all of them, or one of its precise children.
"""
from __future__ import annotations


class SpawnError(Exception):
    """Base class of every celery-spawn error."""


class SpawnConfigError(SpawnError, ValueError):
    """A spawn configuration is malformed: unknown key, wrong type, absurd value."""


class HandlerNotFound(SpawnError, LookupError):
    """No spawn handler is registered under the requested name."""


class HandlerError(SpawnError):
    """A spawn handler raised, or produced something that is not a signature."""


class SpawnValidationError(HandlerError):
    """A handler's ``validate_spawn`` refused the spawn."""


class SpawnLimitExceeded(SpawnError):
    """A handler produced more children than ``max_spawn_count`` allows."""


class SpawnDepthExceeded(SpawnError):
    """Spawning would nest the tree deeper than ``max_depth``."""


class PayloadTooLarge(SpawnError, ValueError):
    """A payload nests deeper than ``spawn_max_payload_depth`` or encodes larger than ``spawn_max_payload_bytes``."""


class DependencyError(SpawnError):
    """A dependency is a cycle, a self-dependency, or names an unknown job."""


class OperationConflict(SpawnError):
    """An explicit ``operation_id`` is already used by another parent."""


class InvalidJobId(SpawnError, ValueError):
    """A parent's id that the tools could not take (outside the one id grammar, ``protocol.ID_PATTERN``)."""


class StoreError(SpawnError):
    """The lineage store could not be reached or written.

    Raised from the parent task so that the failure is visible (the parent
    fails, or retries when ``autoretry_for`` includes it) instead of being
    merely logged.
    """


class JobNotFound(SpawnError, LookupError):
    """No spawned job or operation has the given id."""
