"""The admin pages in headless Chromium, with the operations and jobs a real spawn recorded."""
from __future__ import annotations

import re

from django.contrib.admin.utils import quote

from celery_spawn.contrib.django.models import Job, Operation


def test_the_admin_pages_render_in_chromium(chromium, order, waiting_order, artifacts):
    done, waiting = Operation.objects.get(parent_id=order), Operation.objects.get(parent_id=waiting_order)

    dom = chromium("/admin/celery_spawn/operation/", "--dump-dom")
    assert "Select spawn operation to view" in dom
    assert f">{done.id}</a>" in dom and f">{waiting.id}</a>" in dom
    assert re.search(r'class="spawn-progress" data-done="3" data-total="3"><progress max="3" value="3">', dom)
    assert "0/2 (0%)" in dom and "By progress" in dom and "By state" in dom

    dom = chromium(f"/admin/celery_spawn/job/{quote(order)}/change/", "--dump-dom")
    assert dom.count('class="spawn-child"') == 3 and "orders.tasks.fulfil_order" in dom
    for child in Job.objects.filter(parent_id=order):
        assert child.id in dom
    assert 'class="spawn-tree"' in dom

    child = Job.objects.filter(parent_id=order).order_by("position").first()
    dom = chromium(f"/admin/celery_spawn/job/{quote(child.id)}/change/", "--dump-dom")
    assert f'class="spawn-job" href="/admin/celery_spawn/job/{quote(order)}/change/"' in dom

    dom = chromium(f"/admin/celery_spawn/job/{quote(order)}/tree/", "--dump-dom")
    assert dom.count("orders.tasks.pack_item  succeeded") == 3

    shot = artifacts / "django-admin-operations.png"
    chromium("/admin/celery_spawn/operation/", "--window-size=1400,900", f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
