"""A URLconf that mounts the Prometheus metrics views, for their tests (and the
check that finds them mounted)."""

from __future__ import annotations

from django.urls import path

from queued_storage.integrations.prometheus import metrics_view, unguarded_metrics_view

urlpatterns = [
    path("metrics", metrics_view),
    path("open/metrics", unguarded_metrics_view),
]
