"""A broker with no server: kombu's filesystem transport, made safe for several processes.

kombu's own ``filesystem://`` transport creates a message file in the queue
folder and only then writes the message into it. A consumer that lists the
folder in between moves away an empty file, fails to decode it and stops the
worker (``Unrecoverable error: JSONDecodeError``); the message is lost. With a
prefork worker the pool processes publish while the main process consumes, so
this happens in ordinary use. This transport writes each message under a name
no consumer looks at and renames it into place, which is atomic on one
filesystem: a consumer sees a whole message or none. Consumers claim a message
by renaming it in place too (see :meth:`Channel._get`), and a worker polls the
folder from its event loop (see :meth:`Transport.register_with_event_loop`).

Use it as ``spawnfs://`` (registered with kombu when ``celery_spawn`` is
imported) with :func:`folder_options`::

    app = Celery(broker="spawnfs://")
    app.conf.broker_transport_options = folder_options(".demo/broker")
"""
from __future__ import annotations

import heapq
import os
import shutil
import uuid
from collections import deque
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem, virtual
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

#: The URL scheme this transport answers to.
SCHEME = "spawnfs"
#: What a message file is called until it is complete (``_get`` matches only ``<queue>.msg``).
PARTIAL_SUFFIX = ".part"
#: What a message file is called once a consumer took it, until it is read and removed.
TAKEN_SUFFIX = ".taken"
#: Oldest message names a consumer lists at a time.
NAMES_PER_LISTING = 1000


def folder_options(folder: str | os.PathLike) -> dict:
    """Transport options for one broker folder (queue, processed and control below it), created if missing."""
    base = Path(folder)
    queue, processed, control = base / "queue", base / "processed", base / "control"
    for path in (queue, processed, control):
        path.mkdir(parents=True, exist_ok=True)
    return {"data_folder_in": str(queue), "data_folder_out": str(queue), "processed_folder": str(processed),
            "store_processed": False, "control_folder": str(control)}


class Channel(filesystem.Channel):
    """Publishes by write-then-rename and claims by rename (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._waiting: dict[str, deque[str]] = {}

    def _get(self, queue):
        """The oldest message of ``queue``, claimed by renaming it in place.

        kombu's version lists and sorts the whole folder for every message
        (a spawn of 10,000 children lists 10,000 names 10,000 times) and
        claims a file by moving it to the system's temporary folder, which is
        a copy when that is another filesystem (a tmpfs ``/tmp``): two
        workers could both copy, and both run, the same message. Here the
        oldest names are listed once per :data:`NAMES_PER_LISTING` messages,
        and a rename inside the queue folder (atomic) decides which consumer
        gets each; a name another consumer took is skipped.
        """
        waiting = self._waiting.get(queue)
        if not waiting:
            waiting = self._waiting[queue] = deque(self._oldest_names(queue))
        while waiting:
            name = waiting.popleft()
            path = os.path.join(self.data_folder_in, name)
            taken = path + TAKEN_SUFFIX
            try:
                os.rename(path, taken)
            except FileNotFoundError:
                continue  # another consumer's
            except OSError as exc:
                raise ChannelError(f"Cannot take file {path!r} from queue.") from exc
            try:
                with open(taken, "rb") as f:
                    payload = f.read()
                if self.store_processed:
                    shutil.move(taken, os.path.join(self.processed_folder, name))
                else:
                    os.remove(taken)
            except OSError as exc:
                raise ChannelError(f"Cannot read file {taken!r} from queue.") from exc
            return loads(bytes_to_str(payload))
        raise Empty()

    def _oldest_names(self, queue: str) -> list[str]:
        wanted = f"{queue}.msg"
        names = (name for name in os.listdir(self.data_folder_in) if name.partition(".")[2] == wanted)
        return heapq.nsmallest(NAMES_PER_LISTING, names)

    def _put(self, queue, payload, **kwargs):
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + PARTIAL_SUFFIX
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    """kombu's filesystem transport with atomic publishing and event-loop support (see the module docstring)."""

    Channel = Channel
    global_state = virtual.BrokerState()
    driver_name = SCHEME
    #: Seconds between looks at the queue folder when it was empty (option ``polling_interval``).
    polling_interval = 0.1
    #: Most messages handed over per look, so that the worker's event loop gets its turn in between.
    deliveries_per_poll = 100
    implements = filesystem.Transport.implements.extend(asynchronous=True)

    @property
    def default_connection_params(self) -> dict:
        """No host: a folder broker has none (kombu's default makes every connection warn it used 'localhost')."""
        return {"port": self.default_port}

    def register_with_event_loop(self, connection, loop) -> None:
        """Poll the folder from the worker's event loop (a folder has no file descriptor to wait on).

        Being asynchronous makes Celery run its event loop with the asynchronous
        prefork pool, which gives each pool process its own pipes. The blocking
        loop's pool shares one locked pipe among all processes instead, and a
        process terminated while it holds that lock (``revoke(terminate=True)``
        right after the process acknowledged the task) stops the whole pool.
        """
        self._poll_entry = loop.call_repeatedly(self.polling_interval, self._deliver_waiting)

    def unregister_from_event_loop(self, connection, loop) -> None:
        entry, self._poll_entry = getattr(self, "_poll_entry", None), None
        if entry is not None:
            entry.cancel()

    def _deliver_waiting(self) -> None:
        for _ in range(self.deliveries_per_poll):
            try:
                self.cycle.get(self._deliver, timeout=0)  # type: ignore[union-attr]
            except Empty:
                return
