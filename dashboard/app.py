"""The MemWarden compliance dashboard: ``memwarden up`` and ``memwarden dashboard`` start it
(``streamlit run dashboard/app.py`` with the flags of ``governance._dashboard``)."""

from dashboard import _ui

_ui.main()
