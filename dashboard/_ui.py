"""The dashboard's frame: sign-in, navigation, who is signed in, errors, cached queries.

Queries are cached for ``CACHE_SECONDS`` per principal (the key id is part of every cache key),
so paging back and forth or switching pages does not query again; any write from the dashboard
clears the cache. The key itself is checked on every page run (``Portal.sign_in``).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import streamlit as st

from dashboard import _data
from dashboard._portal import Portal
from eventstore import EventStoreError, VerificationReport
from governance._config import Settings
from governance._errors import InvalidCommand, MemWardenError, NotFound, VersionConflict
from governance._keys import Unauthenticated
from governance._policy import PermissionDenied
from governance._sdk import MemWarden

CACHE_SECONDS = 15
KEY = "memwarden_api_key"
VIEWER = "memwarden_viewer"
TENANT = "memwarden_tenant"
ALL_TENANTS = "All tenants"
T = TypeVar("T")

PAGES = {
    "Compliance": [
        ("views/overview.py", "Overview", ":material/dashboard:"),
        ("views/audit.py", "Audit trail", ":material/receipt_long:"),
        ("views/memory.py", "Memory detail", ":material/history:"),
        ("views/access.py", "Access decisions", ":material/policy:"),
    ],
    "Data protection": [
        ("views/sensitive.py", "Sensitive data", ":material/shield_person:"),
        ("views/retention.py", "Retention", ":material/auto_delete:"),
        ("views/erasures.py", "Erasures", ":material/delete_forever:"),
        ("views/lineage.py", "Lineage", ":material/account_tree:"),
    ],
    "Log": [
        ("views/integrity.py", "Integrity", ":material/verified:"),
    ],
}


def literal(text: str) -> str:
    """``text`` for Streamlit's Markdown (captions, headings, messages) shown as written: every
    ASCII punctuation mark backslash-escaped, so what users wrote (a reason, an actor's name)
    never turns into emphasis, a link or a colour directive."""
    return _MARKDOWN_SPECIALS.sub(r"\\\g<0>", text)


_MARKDOWN_SPECIALS = re.compile(r"[!-/:-@\[-`{-~]")


@st.cache_resource
def portal() -> Portal:
    """One backend for the whole dashboard process, whoever is signed in."""
    return Portal(Settings.from_env())


@dataclass
class Verifications:
    """The last hash-chain verification in this process, shown on the overview."""

    report: VerificationReport | None = None
    at: datetime | None = None
    by: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


@st.cache_resource
def verifications() -> Verifications:
    return Verifications()


def main() -> None:
    st.set_page_config(page_title="MemWarden compliance", page_icon=":material/shield:",
                       layout="wide")
    the_portal = portal()
    the_portal.refresh()
    rebuilding = the_portal.rebuilding()
    if rebuilding is not None:
        st.error(f"The read models are being rebuilt, so no page is shown until they are "
                 f"whole. {rebuilding}.", icon=":material/construction:")
        return
    viewer = _authenticated(the_portal)
    if viewer is None:
        st.navigation([st.Page("views/sign_in.py", title="Sign in", icon=":material/key:")],
                      position="hidden").run()
        return
    st.session_state[VIEWER] = viewer
    _sidebar(viewer, the_portal)
    navigation = st.navigation({
        section: [st.Page(path, title=title, icon=icon) for path, title, icon in pages]
        for section, pages in PAGES.items()})
    try:
        navigation.run()
    finally:
        the_portal.record_reads()


def _authenticated(the_portal: Portal) -> MemWarden | None:
    key = st.session_state.get(KEY)
    if not key:
        return None
    try:
        return the_portal.sign_in(key)
    except Unauthenticated as error:
        st.session_state.pop(KEY, None)
        st.session_state["sign_in_error"] = f"Signed out: {error}."
        return None


def sign_in(key: str) -> str | None:
    """Check ``key``; keep it for this browser session. Returns a problem, or None."""
    if not key.strip():
        return "Paste an API key first."
    try:
        portal().sign_in(key)
    except Unauthenticated as error:
        return f"{error}. Check the key, or ask an administrator for a new one."
    st.session_state[KEY] = key.strip()
    st.session_state.pop("sign_in_error", None)
    return None


def _sidebar(viewer: MemWarden, the_portal: Portal) -> None:
    principal = viewer.principal
    with st.sidebar:
        st.markdown("### :material/shield: MemWarden")
        st.caption("Compliance dashboard")
        with st.container(border=True):
            st.markdown(f"**{principal.subject}**")
            where = "all tenants" if principal.is_platform else f"tenant `{principal.tenant}`"
            st.markdown(f"role `{principal.role}` · {where}")
            if st.button("Sign out", icon=":material/logout:", width="stretch"):
                st.session_state.clear()
                st.rerun()
        if principal.is_platform:
            choices = [ALL_TENANTS, *guarded(lambda: cached_tenants(viewer), default=[])]
            st.selectbox("Tenant", choices, key=TENANT,
                         help="A platform key audits every tenant; choose one to focus.")
        st.caption(f"Database: `{the_portal.database}`")


def viewer() -> MemWarden:
    """The handle of the signed-in key (set by ``main`` on every run)."""
    return st.session_state[VIEWER]


def tenant_in_focus() -> str | None:
    """The tenant the pages show: the key's own, or the one a platform key chose (None: all)."""
    principal = viewer().principal
    if not principal.is_platform:
        return principal.tenant
    chosen = st.session_state.get(TENANT, ALL_TENANTS)
    return None if chosen == ALL_TENANTS else chosen


def cache_key(mw: MemWarden) -> tuple[str, str, str, str | None]:
    p = mw.principal
    return (p.subject, p.tenant, p.role, p.key_id)


def cached(func: Callable[..., T]) -> Callable[..., T]:
    """``st.cache_data`` keyed by the principal: call as ``f(mw, *args)``."""
    name = f"{func.__module__}.{func.__qualname__}"

    # Every wrapper has this same code, so Streamlit keeps one cache for all of them: the
    # wrapped function's name keeps their entries apart.
    @st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
    def run(name: str, principal: tuple[str, str, str, str | None], *args: Any,
            _mw: MemWarden) -> T:
        return func(_mw, *args)

    def call(mw: MemWarden, *args: Any) -> T:
        return run(name, cache_key(mw), *args, _mw=mw)

    return call


cached_tenants = cached(_data.tenants)


def after_write() -> None:
    """Every cached query may be stale now."""
    st.cache_data.clear()


def denial_message(error: PermissionDenied) -> str:
    if error.hides_existence:
        resource = error.decision.resource
        return f"No {resource.kind} with id `{resource.id}`."
    role = error.decision.principal.role
    return (f"Your role (`{role}`) may not do this: {error.decision.explanation}. "
            "The refusal was recorded in the audit trail. Ask an administrator for a key with "
            "the rights you need.")


@contextmanager
def shown_errors() -> Iterator[None]:
    """Show MemWarden's errors on the page, each with what to do about it."""
    try:
        yield
    except PermissionDenied as error:
        icon = ":material/search_off:" if error.hides_existence else ":material/lock:"
        st.error(denial_message(error), icon=icon)
    except NotFound as error:
        st.warning(f"{error}.", icon=":material/search_off:")
    except VersionConflict as error:
        st.warning(f"{error}.", icon=":material/sync_problem:")
    except (InvalidCommand, MemWardenError) as error:
        st.error(f"{error}.", icon=":material/error:")
    except EventStoreError as error:
        st.error(f"The database did not answer: {error}. Try again shortly.",
                 icon=":material/cloud_off:")


def guarded(func: Callable[[], T], *, default: T) -> T:
    """``func()``, or ``default`` after showing why it failed."""
    result = default
    with shown_errors():
        result = func()
    return result


def when(moment: datetime | None) -> str:
    if moment is None:
        return "—"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
