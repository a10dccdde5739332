from dashboard import _views

_views.memory()
