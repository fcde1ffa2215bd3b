"""The admin: operations with their progress, jobs with their parent, children and tree, and a cancel action.

Everything is read-only; the cancel actions go through :func:`celery_spawn.cancel`, the one cancel of
the API, the CLI and the web API.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.utils import quote, unquote
from django.db.models import Count, F, IntegerField, OuterRef, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from django.http import Http404, HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from ...protocol import FINAL
from .models import CANCEL_PERMISSION, Job, Operation

#: Children listed on a job's page (the rest through the filtered job list).
CHILDREN_SHOWN = 50
#: Levels of a tree drawn on its page when ``?depth=`` does not say.
TREE_DEPTH = 10
MAX_TREE_DEPTH = 100


def _job_url(job_id: str) -> str:
    return reverse("admin:celery_spawn_job_change", args=[quote(job_id)])


def _tree_url(job_id: str) -> str:
    return reverse("admin:celery_spawn_job_tree", args=[quote(job_id)])


def _job_link(job_id: str | None) -> str:
    if not job_id:
        return "-"
    return format_html('<a class="spawn-job" href="{}">{}</a>', _job_url(job_id), job_id)


class SpawnAdmin(admin.ModelAdmin):
    """Read-only pages over a spawn table, with the cancel actions."""

    actions = ["cancel", "cancel_store_only"]
    list_per_page = 50

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm(f"celery_spawn.{CANCEL_PERMISSION}"))

    def cancel_targets(self, queryset: QuerySet) -> Iterable[str]:
        """The ids :func:`celery_spawn.cancel` takes for the selected rows."""
        return queryset.values_list("pk", flat=True)

    @admin.action(description="Cancel the selected trees (revoke what runs)", permissions=["cancel"])
    def cancel(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._cancel(request, queryset, store_only=False)

    @admin.action(description="Cancel the selected trees in the store only (no broker)", permissions=["cancel"])
    def cancel_store_only(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._cancel(request, queryset, store_only=True)

    def _cancel(self, request: HttpRequest, queryset: QuerySet, store_only: bool) -> None:
        from ...control import cancel
        from ...errors import JobNotFound
        from .project import celery_app

        app = celery_app()
        cancelled = revoked = trees = 0
        for target in self.cancel_targets(queryset):
            try:
                result = cancel(app, target, store_only=store_only)
            except JobNotFound:
                self.message_user(request, f"{target} is not in the spawn store", messages.ERROR)
                continue
            except Exception as exc:  # the broker (revokes) or the store is out of reach: say which, go on
                hint = "" if store_only else "; the store-only cancel needs no broker"
                self.message_user(request, f"could not cancel {target}: {type(exc).__name__}: {exc}{hint}",
                                  messages.ERROR)
                continue
            trees += 1
            cancelled += result["cancelled"]
            revoked += result["revoked"]
        if trees:
            self.message_user(request, f"cancelled {cancelled} waiting and revoked {revoked} running jobs "
                                       f"in {trees} tree{'s' if trees != 1 else ''}", messages.SUCCESS)


class ProgressFilter(admin.SimpleListFilter):
    """Operations by how many of their children finished."""

    title = "progress"
    parameter_name = "progress"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("none", "no child finished"), ("partial", "some children finished"),
                ("all", "every child finished")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet | None:
        value = self.value()
        if value == "none":
            return queryset.filter(done=0)
        if value == "partial":
            return queryset.filter(done__gt=0, done__lt=F("total"))
        if value == "all":
            return queryset.filter(done__gte=F("total"))
        return None


@admin.register(Operation)
class OperationAdmin(SpawnAdmin):
    list_display = ("id", "label", "state", "progress", "handler", "queue", "parent", "created_at", "finished_at")
    list_filter = ("state", ProgressFilter, "handler", "queue")
    search_fields = ("=id", "=label", "=parent_id", "=root_id", "handler")
    fieldsets = [
        (None, {"fields": ["id", "label", "state", "progress", "handler", "queue", "error"]}),
        ("Lineage", {"fields": ["parent", "children", "tree", "root_id", "depth", "parent_task"]}),
        ("Completion", {"fields": ["completed", "wait_for_descendants", "fail_fast", "on_complete",
                                   "callback_state", "callback_run", "callback_worker", "callback_sends",
                                   "created_at", "updated_at", "finished_at"]}),
        ("Config", {"fields": ["config"], "classes": ["collapse"]}),
    ]
    readonly_fields = ["progress", "parent", "children", "tree"]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        finished = (Job.objects.filter(operation_id=OuterRef("pk"), state__in=FINAL).order_by()
                    .values("operation_id").annotate(n=Count("pk")).values("n"))
        return super().get_queryset(request).annotate(
            done=Coalesce(Subquery(finished, output_field=IntegerField()), Value(0)))

    @admin.display(description="progress", ordering="done")
    def progress(self, obj: Operation) -> str:
        done, total = getattr(obj, "done", 0), obj.total
        percent = 100 * done // total if total else 0
        return format_html('<span class="spawn-progress" data-done="{}" data-total="{}">'
                           '<progress max="{}" value="{}"></progress> {}/{} ({}%)</span>',
                           done, total, max(total, 1), done, done, total, percent)

    @admin.display(description="parent job")
    def parent(self, obj: Operation) -> str:
        return _job_link(obj.parent_id)

    @admin.display(description="children")
    def children(self, obj: Operation) -> str:
        url = reverse("admin:celery_spawn_job_changelist") + f"?operation_id__exact={obj.id}"
        return format_html('<a class="spawn-children" href="{}">{} children</a>', url, obj.total)

    @admin.display(description="tree")
    def tree(self, obj: Operation) -> str:
        return format_html('<a class="spawn-tree" href="{}">tree below {}</a>', _tree_url(obj.parent_id),
                           obj.parent_id)


@admin.register(Job)
class JobAdmin(SpawnAdmin):
    list_display = ("id", "task_name", "state", "operation", "parent", "depth", "created_at", "finished_at")
    list_filter = ("state", "task_name", "queue")
    search_fields = ("=id", "task_name", "=parent_id", "=root_id", "=operation_id")
    fieldsets = [
        (None, {"fields": ["id", "task_name", "state", "queue", "priority", "worker", "retries", "redeliveries",
                           "error"]}),
        ("Lineage", {"fields": ["parent", "operation", "children", "spawned", "tree", "root_id", "depth",
                                "position", "pending_deps"]}),
        ("Times", {"fields": ["created_at", "dispatched_at", "started_at", "finished_at", "not_before"]}),
        ("Message", {"fields": ["message"], "classes": ["collapse"]}),
    ]
    readonly_fields = ["parent", "operation", "children", "spawned", "tree"]

    @admin.display(description="parent job")
    def parent(self, obj: Job) -> str:
        if obj.parent_id and not Job.objects.filter(pk=obj.parent_id).exists():
            return format_html('{} <span class="help">(not recorded)</span>', obj.parent_id)
        return _job_link(obj.parent_id)

    @admin.display(description="spawned by operation")
    def operation(self, obj: Job) -> str:
        if not obj.operation_id:
            return "-"
        url = reverse("admin:celery_spawn_operation_change", args=[quote(obj.operation_id)])
        return format_html('<a class="spawn-operation" href="{}">{}</a>', url, obj.operation_id)

    @admin.display(description="children")
    def children(self, obj: Job) -> str:
        children = Job.objects.filter(parent_id=obj.id).order_by("position", "id")
        shown = list(children.values_list("id", "task_name", "state")[:CHILDREN_SHOWN])
        if not shown:
            return "none"
        items = format_html_join("", '<li><a class="spawn-child" href="{}">{}</a> {} <b>{}</b></li>',
                                 ((_job_url(child), child, task, state) for child, task, state in shown))
        count = children.count()
        url = reverse("admin:celery_spawn_job_changelist") + f"?parent_id__exact={obj.id}"
        return format_html('<ul class="spawn-children">{}</ul><a href="{}">all {} children</a>', items, url, count)

    @admin.display(description="operations it spawned")
    def spawned(self, obj: Job) -> str:
        ids = list(Operation.objects.filter(parent_id=obj.id).values_list("id", flat=True)[:CHILDREN_SHOWN])
        if not ids:
            return "none"
        return format_html_join(", ", '<a class="spawn-operation" href="{}">{}</a>',
                                ((reverse("admin:celery_spawn_operation_change", args=[quote(op)]), op)
                                 for op in ids))

    @admin.display(description="tree")
    def tree(self, obj: Job) -> str:
        return format_html('<a class="spawn-tree" href="{}">tree below this job</a> · '
                           '<a class="spawn-tree-full" href="{}?full=1">the whole tree</a>',
                           _tree_url(obj.id), _tree_url(obj.id))

    def get_urls(self) -> list:
        tree = path("<path:object_id>/tree/", self.admin_site.admin_view(self.tree_view),
                    name="celery_spawn_job_tree")
        return [tree, *super().get_urls()]

    def tree_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The tree below a job (``?full=1``: the whole tree it is in), drawn as ``celery spawn tree`` draws it."""
        from ...render.trees import tree_text
        from ...state import get_state
        from ...store import queries
        from .project import celery_app

        if not self.has_view_permission(request):
            raise Http404
        job_id = unquote(object_id)
        full = request.GET.get("full") == "1"
        try:
            depth = min(max(int(request.GET.get("depth", TREE_DEPTH)), 1), MAX_TREE_DEPTH)
        except ValueError:
            depth = TREE_DEPTH
        with get_state(celery_app()).store.read() as conn:
            tree = queries.spawn_tree(conn, job_id, max_depth=depth, full=full)
        if tree is None:
            raise Http404(f"no job {job_id} in the spawn store")
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"Spawn tree of {job_id}",
            "job_id": job_id,
            "job_url": _job_url(job_id),
            "full": full,
            "depth": depth,
            "text": tree_text(tree, highlight=job_id, cut_option="?depth="),
        }
        return TemplateResponse(request, "admin/celery_spawn/job/tree.html", context)
