"""SpawnStore: the one way into the SQL tables, for the engine and the faces alike.

What the store does is grouped by subject in the parts it is made of, each
over the plumbing of :mod:`.connection`: spawn records, cancels, job
transitions, completion, callbacks' runs, recovery and retention. Every value reaches SQL as a bound
parameter.
"""
from __future__ import annotations

from .callbacks import CallbackRuns
from .completion import Completions
from .recovery import Recovery
from .retention import Retention
from .transitions import JobTransitions


class SpawnStore(CallbackRuns, Completions, JobTransitions, Recovery, Retention):
    """Reads and writes spawn operations, jobs and dependency edges."""
