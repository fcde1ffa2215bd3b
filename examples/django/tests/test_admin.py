"""The admin: operations with progress and filters, job pages with parent, children and tree, and cancel."""
from __future__ import annotations

import pytest
from django.contrib.admin.utils import quote

from celery_spawn.contrib.django.models import Job, Operation

OPERATIONS = "/admin/celery_spawn/operation/"
JOBS = "/admin/celery_spawn/job/"


def page(client, url: str) -> str:
    response = client.get(url)
    assert response.status_code == 200, (url, response.status_code)
    return response.content.decode()


def test_operations_with_progress_and_filters(admin_client, order, waiting_order):
    done, waiting = Operation.objects.get(parent_id=order), Operation.objects.get(parent_id=waiting_order)
    html = page(admin_client, OPERATIONS)
    assert 'class="spawn-progress" data-done="3" data-total="3"' in html and "3/3 (100%)" in html
    assert 'class="spawn-progress" data-done="0" data-total="2"' in html and "0/2 (0%)" in html
    assert "By state" in html and "By progress" in html
    running = page(admin_client, OPERATIONS + "?state__exact=running")
    assert waiting.id in running and done.id not in running
    finished = page(admin_client, OPERATIONS + "?progress=all")
    assert done.id in finished and waiting.id not in finished
    untouched = page(admin_client, OPERATIONS + "?progress=none")
    assert waiting.id in untouched and done.id not in untouched


def test_an_operation_page_links_its_parent_children_and_tree(admin_client, order):
    operation = Operation.objects.get(parent_id=order)
    html = page(admin_client, f"{OPERATIONS}{quote(operation.id)}/change/")
    assert f'href="{JOBS}{quote(order)}/change/"' in html
    assert f'{JOBS}?operation_id__exact={operation.id}' in html and "3 children" in html
    assert f'{JOBS}{quote(order)}/tree/' in html


def test_a_job_page_shows_its_parent_its_children_and_a_link_to_the_tree(admin_client, order):
    children = list(Job.objects.filter(parent_id=order).order_by("position"))
    assert len(children) == 3
    parent_html = page(admin_client, f"{JOBS}{quote(order)}/change/")
    assert parent_html.count('class="spawn-child"') == 3
    for child in children:
        assert f'href="{JOBS}{quote(child.id)}/change/"' in parent_html
    assert "orders.tasks.pack_item" in parent_html and 'class="spawn-operation"' in parent_html
    child_html = page(admin_client, f"{JOBS}{quote(children[0].id)}/change/")
    assert f'<a class="spawn-job" href="{JOBS}{quote(order)}/change/">{order}</a>' in child_html
    assert f'href="{JOBS}{quote(children[0].id)}/tree/"' in child_html
    tree = page(admin_client, f"{JOBS}{quote(children[0].id)}/tree/?full=1")
    assert f'data-job-id="{children[0].id}"' in tree
    assert "orders.tasks.fulfil_order  succeeded" in tree and tree.count("orders.tasks.pack_item  succeeded") == 3
    assert admin_client.get(f"{JOBS}no-such-job/tree/").status_code == 404


def test_the_cancel_action_cancels_through_the_one_cancel(admin_client, waiting_order):
    operation = Operation.objects.get(parent_id=waiting_order)
    assert set(Job.objects.filter(operation_id=operation.id).values_list("state", flat=True)) == {"dispatched"}
    response = admin_client.post(OPERATIONS, {"action": "cancel", "_selected_action": [operation.id]}, follow=True)
    assert "Cancelled 0 waiting and revoked 2 running jobs in 1 tree" in response.content.decode()
    assert set(Job.objects.filter(operation_id=operation.id).values_list("state", flat=True)) == {"revoked"}
    assert Operation.objects.get(pk=operation.id).state == "cancelled"


def test_the_pages_are_read_only(admin_client, order):
    operation = Operation.objects.get(parent_id=order)
    assert admin_client.get(f"{OPERATIONS}add/").status_code == 403
    html = page(admin_client, f"{OPERATIONS}{quote(operation.id)}/change/")
    assert 'name="_save"' not in html
    with pytest.raises(TypeError, match="read-only"):
        operation.save()
    with pytest.raises(TypeError, match="read-only"):
        operation.delete()


def test_cancel_needs_its_permission(client, django_user_model, waiting_order):
    from django.contrib.auth.models import Permission

    viewer = django_user_model.objects.create_user("viewer", password="x", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_operation"))
    client.force_login(viewer)
    html = page(client, OPERATIONS)
    assert Operation.objects.get(parent_id=waiting_order).id in html
    assert 'value="cancel"' not in html
