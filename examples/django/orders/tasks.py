"""``fulfil_order`` runs, then spawns ``pack_item`` for each item of the order it returned."""
from celery import shared_task

from celery_spawn import SpawnHandler, SpawnTask


class PackEachItem(SpawnHandler):
    """One child per item of the order the parent returned."""

    def validate_spawn(self, parent, config):
        if not parent.arguments.get("items"):
            raise ValueError("an order needs items")

    def spawn_jobs(self, context):
        order = context.parent.result
        for sku in order["items"]:
            yield pack_item.s(order["order_id"], sku)


@shared_task(base=SpawnTask, spawn_handler=PackEachItem())
def fulfil_order(order_id, items):
    return {"order_id": order_id, "items": list(items)}


@shared_task
def pack_item(order_id, sku):
    return f"{order_id}/{sku} packed"
