"""The engine: what happens to a spawn after its parent returns.

Each part gets what it uses through its constructor (the wiring in
:mod:`celery_spawn.state` builds them) and writes only through named store
methods:

- :mod:`~.children` and :mod:`~.spawner`: one spawn, from config to recorded rows;
- :mod:`~.publisher`: the one publisher every message goes through; :mod:`~.outbox` sends recorded rows;
- :mod:`~.tracker` and :mod:`~.writebehind`: worker events, transitions, released dependents published;
- :mod:`~.completion`: completing operations and their ``on_complete``;
- :mod:`~.cancel`: the one cancel;
- :mod:`~.recovery` and :mod:`~.redelivery`: the sweep.
"""
