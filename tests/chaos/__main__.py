"""``python -m tests.chaos --schedules N --seed S``: randomized fault schedules against real workers.

Prints each schedule (its seed, tree and faults) and its verdict, with the
command that replays a failed one alone, then the summary table. Exits 1
when any schedule found a problem. ``--write-docs`` puts the table in
``docs/reliability.md``.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path

from tests.chaos.report import table, write_docs
from tests.chaos.runner import explore, plan_schedules
from tests.chaos.schedule import STACKS

ARTIFACTS = Path(os.environ.get("SPAWN_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent.parent
                                / "test-artifacts"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", type=int, default=10, help="how many schedules (default 10)")
    parser.add_argument("--seed", type=int, default=1600, help="seed of the first schedule; schedule i uses seed+i")
    parser.add_argument("--stack", choices=(*STACKS, "both"), default="both",
                        help="broker and store; 'both' (the default) alternates them")
    parser.add_argument("--write-docs", action="store_true", help="write the summary table into docs/reliability.md")
    args = parser.parse_args(argv)
    if args.schedules < 1:
        parser.error("--schedules must be at least 1")
    # Stopped by SIGINT or SIGTERM (even when started in the background, where SIGINT is ignored), the run still
    # stops its workers and its redis-server and drops its databases on the way out.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    for key in [k for k in os.environ if k.startswith("CELERY_SPAWN_")]:
        del os.environ[key]  # settings of the shell must not reach the workers
    schedules = plan_schedules(args.schedules, args.seed, args.stack)
    results: list = []
    stopped = None
    try:
        with tempfile.TemporaryDirectory(prefix="spawn-chaos-") as workdir:
            explore(schedules, Path(workdir), ARTIFACTS / "chaos", say=lambda line: print(line, flush=True),
                    results=results)
    except (KeyboardInterrupt, SystemExit) as exc:
        stopped = exc
        print(f"stopped after {len(results)} of {len(schedules)} schedules", flush=True)
    if results:
        text = table(results, args.seed, planned=len(schedules))
        print(text)
        if args.write_docs:
            write_docs(text)
    if stopped is not None:
        return 130
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
