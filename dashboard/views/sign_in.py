from dashboard import _views

_views.sign_in()
