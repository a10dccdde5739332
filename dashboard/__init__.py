"""The Streamlit compliance dashboard: pages over the governance SDK, never over raw tables.

``dashboard/app.py`` is the Streamlit script; ``governance._dashboard`` starts it as a process.
"""
