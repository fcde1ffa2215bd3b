"""The server-less broker: publishing is atomic, so a consumer never reads half a message."""
from __future__ import annotations

import multiprocessing
import os
import time
from queue import Empty

import pytest
from kombu import Connection, Queue

import celery_spawn  # noqa: F401 - registers spawnfs://
from celery_spawn.transport.spawnfs import PARTIAL_SUFFIX, Transport, folder_options

MESSAGES_PER_PUBLISHER = 1500


def _publish(options: dict, queue: str, tag: str, count: int) -> None:
    with Connection("spawnfs://", transport_options=options) as conn:
        producer = conn.Producer(serializer="json")
        for n in range(count):
            producer.publish({"tag": tag, "n": n, "pad": "x" * 2000}, routing_key=queue)


def test_spawnfs_scheme_resolves_to_the_atomic_transport(tmp_path):
    with Connection("spawnfs://", transport_options=folder_options(tmp_path)) as conn:
        assert isinstance(conn.transport, Transport)


def test_folder_options_create_the_folders(tmp_path):
    options = folder_options(tmp_path / "broker")
    for key in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
        assert os.path.isdir(options[key])
    assert options["data_folder_in"] == options["data_folder_out"]


def test_a_file_still_being_written_is_not_consumed(tmp_path):
    options = folder_options(tmp_path)
    queue = Queue("jobs", routing_key="jobs")
    partial = os.path.join(options["data_folder_in"], f"1_abc.jobs.msg{PARTIAL_SUFFIX}")
    with open(partial, "wb"):
        pass  # created, nothing written yet: what a publisher looks like mid-write
    with Connection("spawnfs://", transport_options=options) as conn:
        with pytest.raises(Empty):
            conn.SimpleQueue(queue).get(block=False)
    assert os.path.exists(partial)


def test_consumer_reads_every_message_whole_while_two_processes_publish(tmp_path):
    """kombu's plain filesystem transport loses messages here (an empty file is read: JSONDecodeError)."""
    options = folder_options(tmp_path)
    queue = Queue("jobs", routing_key="jobs")
    ctx = multiprocessing.get_context("fork")
    publishers = [ctx.Process(target=_publish, args=(options, "jobs", tag, MESSAGES_PER_PUBLISHER))
                  for tag in ("a", "b")]
    seen: dict[str, list[int]] = {"a": [], "b": []}
    with Connection("spawnfs://", transport_options=options) as conn:
        inbox = conn.SimpleQueue(queue)
        for p in publishers:
            p.start()
        expected = 2 * MESSAGES_PER_PUBLISHER
        while sum(map(len, seen.values())) < expected:
            message = inbox.get(block=True, timeout=30)
            body = message.payload
            seen[body["tag"]].append(body["n"])
            message.ack()
        for p in publishers:
            p.join(timeout=30)
            assert p.exitcode == 0
    for tag, numbers in seen.items():
        assert sorted(numbers) == list(range(MESSAGES_PER_PUBLISHER)), tag
    leftovers = [name for name in os.listdir(options["data_folder_in"]) if not name.startswith(".")]
    assert leftovers == []


def test_messages_reach_a_consumer_through_the_event_loop(tmp_path):
    """Celery runs its event loop (and the prefork pool with a pipe per process) only for asynchronous transports."""
    from kombu.asynchronous import Hub

    options = {**folder_options(tmp_path), "polling_interval": 0.01}
    queue = Queue("jobs", routing_key="jobs")
    received: list[int] = []
    hub = Hub()
    with Connection("spawnfs://", transport_options=options) as conn:
        assert conn.transport.implements.asynchronous
        with conn.Consumer(queue, callbacks=[lambda body, message: (received.append(body["n"]), message.ack())]):
            conn.transport.register_with_event_loop(conn.connection, hub)
            producer = conn.Producer(serializer="json")
            for n in range(250):  # more than one poll delivers
                producer.publish({"n": n}, routing_key="jobs")
            loop = hub.create_loop()
            deadline = time.monotonic() + 10
            while len(received) < 250 and time.monotonic() < deadline:
                next(loop)
            conn.transport.unregister_from_event_loop(conn.connection, hub)
    hub.close()
    assert sorted(received) == list(range(250))


def test_a_folder_broker_does_not_warn_about_a_missing_hostname(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="kombu.connection"):
        with Connection("spawnfs://", transport_options=folder_options(tmp_path)) as conn:
            conn.connect()
            conn.clone().connect()
    assert "hostname" not in caplog.text


def _consume_all(options: dict, queue: str, out, idle_seconds: float = 2.0) -> None:
    """Take messages until none came for ``idle_seconds``; send what was taken to ``out``."""
    taken = []
    with Connection("spawnfs://", transport_options=options) as conn:
        inbox = conn.SimpleQueue(Queue(queue, routing_key=queue))
        while True:
            try:
                message = inbox.get(block=True, timeout=idle_seconds)
            except Empty:
                break
            taken.append(message.payload["n"])
            message.ack()
    out.put(taken)


def test_two_consumers_share_a_folder_and_each_message_is_taken_once(tmp_path):
    options = folder_options(tmp_path)
    _publish(options, "jobs", "a", 2000)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    consumers = [ctx.Process(target=_consume_all, args=(options, "jobs", out)) for _ in range(2)]
    for p in consumers:
        p.start()
    taken = [out.get(timeout=60) for _ in consumers]
    for p in consumers:
        p.join(timeout=30)
    assert all(taken), "both consumers got work"
    assert sorted(taken[0] + taken[1]) == list(range(2000))


def test_consuming_lists_the_folder_once_per_batch_and_never_uses_the_temp_folder(tmp_path, monkeypatch):
    """kombu's own version lists (and sorts) the folder for every message and moves each through /tmp."""
    import tempfile

    options = folder_options(tmp_path / "broker")
    _publish(options, "jobs", "a", 1500)
    listings = []
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda path=".": listings.append(path) or real_listdir(path))
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "no-such-folder"))
    with Connection("spawnfs://", transport_options=options) as conn:
        inbox = conn.SimpleQueue(Queue("jobs", routing_key="jobs"))
        got = []
        for _ in range(1500):
            message = inbox.get(block=False)
            got.append(message.payload["n"])
            message.ack()
    assert sorted(got) == list(range(1500))
    assert len([p for p in listings if p == options["data_folder_in"]]) <= 3


def test_the_former_module_name_still_imports():
    from celery_spawn import embedded

    assert embedded.Transport is Transport and embedded.folder_options is folder_options
