"""The project's URLs and, for the browser tests only, a login by a token the test made."""
from django.conf import settings
from django.contrib.auth import get_user_model, login
from django.http import Http404, HttpResponseRedirect
from django.urls import path
from django.utils.http import url_has_allowed_host_and_scheme

from proj.urls import urlpatterns as project_urls


def login_for_tests(request, token):
    expected = getattr(settings, "BROWSER_LOGIN_TOKEN", None)
    if not expected or token != expected:
        raise Http404
    login(request, get_user_model().objects.get(username="admin"), backend="django.contrib.auth.backends.ModelBackend")
    target = request.GET.get("next", "/admin/")
    if not url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        target = "/admin/"
    return HttpResponseRedirect(target)


urlpatterns = [path("login-for-tests/<str:token>/", login_for_tests), *project_urls]
