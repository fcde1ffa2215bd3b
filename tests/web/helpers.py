"""Helpers of the web tests: ``celery spawn serve`` as a real process, JSON over HTTP, required programs."""
from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.harness import ROOT, service_missing

TIMEOUT = 240  # generous: CI machines are shared and the embedded broker polls once a second
#: A queue name that is SQL-looking data: it must come back as data.
NASTY_QUEUE = "q'; DROP TABLE spawn_jobs; --\"`"

#: The real ``celery`` command line (``celery spawn serve`` comes through the ``celery.commands`` entry point).
CELERY = [sys.executable, "-m", "celery"]
_SERVING = re.compile(r"serving .* on (http://\S+?)/ ")


def clean_env(**extra: str) -> dict:
    """This process's environment without any ``CELERY_SPAWN_*`` setting, able to import ``tests``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_SPAWN_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


def stop_main_process(worker, timeout: float = 30) -> None:
    """Warm-stop a worker with SIGTERM to its main process alone, before the harness stops it.

    The harness sends SIGTERM to the worker's whole process group; the pool
    children die first and the main process of a tests.app worker then often
    waits ~30 s for the harness to kill it. Its main process alone stops in
    seconds, which keeps this suite's time down.
    """
    if worker.proc is None or worker.proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(worker.proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.proc.wait(timeout)


class Served:
    """``celery -A tests.app spawn serve --port 0 ...`` as a subprocess; ``url`` once it listens."""

    def __init__(self, env: dict, *args: str, app: str | None = "tests.app", log: Path | None = None) -> None:
        command = [*CELERY, *(["-A", app] if app else []), "spawn", "serve", *args]
        self.log_path = log
        self._log = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.url: str | None = None

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_ready(self, timeout: float = 60) -> Served:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.output.append(line)
            found = _SERVING.search(line)
            if found:
                self.url = found.group(1)
                return self
        self.stop()
        raise AssertionError(
            f"serve did not start (exit {self.proc.returncode}):\n{''.join(self.output)}\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self._log is not subprocess.DEVNULL:
            self._log.close()


@contextlib.contextmanager
def served(env: dict, *args: str, **kwargs) -> Iterator[Served]:
    server = Served(env, *args, **kwargs).wait_ready()
    try:
        yield server
    finally:
        server.stop()


def get_json(url: str, token: str | None = None) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def require_program(*names: str) -> str:
    """The path of the first program found; skip (fail in CI) when none is installed."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    service_missing(" or ".join(names), FileNotFoundError(f"{names[0]} is not installed"))
    raise AssertionError("unreachable")
