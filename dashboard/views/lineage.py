from dashboard import _views

_views.lineage()
