"""The randomized fault explorer: ``python -m tests.chaos --schedules N --seed S [--stack ...]``.

Each schedule (:mod:`~tests.chaos.schedule`, pure and seeded) is a tree of
spawns with dependencies, nesting, delays and ``on_complete`` callbacks, and
faults at random moments: SIGKILL of the worker or of one of its processes,
broker and store cuts and hangs through a TCP proxy. The runner
(:mod:`~tests.chaos.runner`) plays it against a real worker on Redis +
PostgreSQL or RabbitMQ + MariaDB; the children write their own history
(:mod:`~tests.chaos.history`), and the checker (:mod:`~tests.chaos.checker`)
holds the store's final tree against it. ``tests/reliability/test_chaos.py``
runs it under pytest.
"""
