"""Labels on every backend: a label names the newest of its operations, the listing filters by label or id."""
from __future__ import annotations

import pytest

from celery_spawn.handlers import labelled_operation_id
from celery_spawn.store import queries
from tests.store.helpers import ago, op_row, seed


@pytest.fixture
def labelled(store):
    """Three operations labelled ``nightly`` (the first holds the label as its id), one ``weekly``, one unlabelled."""
    later, newest = labelled_operation_id("nightly", "p2"), labelled_operation_id("nightly", "p3")
    seed(store, [
        op_row("nightly", "p1", label="nightly", created=ago(300)),
        op_row(later, "p2", label="nightly", created=ago(200)),
        op_row(newest, "p3", label="nightly", created=ago(100)),
        op_row("weekly", "p4", label="weekly", created=ago(50)),
        op_row("plain-op", "p5", created=ago(10)),
    ])
    return {"first": "nightly", "later": later, "newest": newest}


def resolve(store, token):
    with store.read() as conn:
        return queries.resolve_operation(conn, token)


def test_a_label_names_its_newest_operation_and_counts_the_others(store, labelled):
    operation, others = resolve(store, "nightly")
    assert operation["id"] == labelled["newest"] and operation["parent_id"] == "p3"
    assert operation["label"] == "nightly" and others == 2
    assert set(operation) == set(queries.OPERATION_FIELDS)
    assert resolve(store, "weekly")[0]["id"] == "weekly" and resolve(store, "weekly")[1] == 0


def test_an_operation_id_is_found_when_no_label_matches(store, labelled):
    operation, others = resolve(store, labelled["later"])
    assert (operation["id"], operation["label"], others) == (labelled["later"], "nightly", 0)
    operation, others = resolve(store, "plain-op")
    assert (operation["id"], operation["label"], others) == ("plain-op", None, 0)
    assert resolve(store, "nothing-by-that-name") == (None, 0)


def test_operations_created_at_once_are_ordered_by_id(store):
    at = ago(5)
    seed(store, [op_row("same~a", "p1", label="same", created=at), op_row("same~b", "p2", label="same", created=at)])
    operation, others = resolve(store, "same")
    assert (operation["id"], others) == ("same~b", 1)


def test_values_are_data(store):
    nasty = "x' OR '1'='1"
    seed(store, [op_row("op-nasty", "p", label=nasty)])
    assert resolve(store, nasty)[0]["id"] == "op-nasty"
    assert resolve(store, "%") == (None, 0)
    with store.read() as conn:
        assert queries.list_operations(conn, operation="%") == []
        assert [op["id"] for op in queries.list_operations(conn, operation=nasty)] == ["op-nasty"]


def test_the_listing_filters_by_label_or_id(store, labelled):
    with store.read() as conn:
        listed = queries.list_operations(conn, operation="nightly")
        assert [op["id"] for op in listed] == [labelled["newest"], labelled["later"], labelled["first"]]
        assert {op["label"] for op in listed} == {"nightly"}
        assert [op["id"] for op in queries.list_operations(conn, operation=labelled["later"])] == [labelled["later"]]
        assert [op["id"] for op in queries.list_operations(conn, operation="plain-op")] == ["plain-op"]
        assert queries.list_operations(conn, operation="unknown") == []
        assert [op["id"] for op in queries.list_operations(conn, operation="nightly", limit=1)] == [labelled["newest"]]
        everything = queries.list_operations(conn)
    assert len(everything) == 5 and {op["id"]: op["label"] for op in everything}["plain-op"] is None


def test_the_store_resolves_for_the_engine(store, labelled):
    with store.read() as conn:
        operation, others = store.resolve_operation(conn, "nightly")
    assert (operation["id"], others) == (labelled["newest"], 2)
