"""The pages. Each is thin: it asks ``dashboard._data`` (through the signed-in key's SDK handle)
and lays the answer out; ``dashboard/views/*.py`` are the Streamlit page scripts calling these.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import _data, _ui
from governance._oversight import text_withheld
from projections import MemoryState

COLORS = {"Writes": "#4C78A8", "Reads": "#72B7B2", "Denials": "#E45756",
          "PII findings": "#F58518", "Expiries": "#B279A2", "Erasures": "#54A24B"}
MEMORY_PARAM = "memory"
PENDING_ROLLBACK = "pending_rollback"
AUDIT_QUERY, AUDIT_CURSORS = "audit_query", "audit_cursors"

_overview = _ui.cached(_data.overview)
_audit_page = _ui.cached(_data.audit_page)
_access = _ui.cached(_data.access_decisions)
_choices = _ui.cached(_data.memory_choices)


def _heading(title: str, caption: str) -> None:
    st.title(title)
    st.caption(caption)


# -- sign-in ------------------------------------------------------------------------------


def sign_in() -> None:
    _, middle, _ = st.columns([1, 2, 1])
    with middle:
        st.title(":material/shield: MemWarden")
        st.subheader("Compliance dashboard")
        st.write("Sign in with an API key. What you see is what the key's role may see: an "
                 "auditor sees metadata and the audit trail, never memory content; a compliance "
                 "officer sees everything in the tenant.")
        if problem := st.session_state.get("sign_in_error"):
            st.warning(problem, icon=":material/key_off:")
        with st.form("sign_in"):
            key = st.text_input("API key", type="password", placeholder="mwk_…")
            submitted = st.form_submit_button("Sign in", type="primary",
                                              icon=":material/login:")
        if submitted:
            problem = _ui.sign_in(key)
            if problem is None:
                st.rerun()
            st.error(problem, icon=":material/key_off:")
        st.caption("`memwarden up` prints the admin key on first start (and keeps it in "
                   "`data/admin.key`); `memwarden keys create --tenant T --subject S --role "
                   "auditor` issues others.")


# -- overview -----------------------------------------------------------------------------


def overview() -> None:
    mw, tenant = _ui.viewer(), _ui.tenant_in_focus()
    _heading("Overview", f"What happened in {_scope(tenant)}: every figure counted from the "
                         "immutable event log.")
    window = st.segmented_control("Window", list(_data.WINDOWS), default="Last 30 days",
                                  key="overview_window", label_visibility="collapsed")
    span = _data.WINDOWS[window or "All time"]
    # Rounded to the minute, so that the cached answer serves every run of that minute.
    since = _minute(datetime.now(UTC) - span) if span is not None else None
    data = _ui.guarded(lambda: _overview(mw, tenant, since), default=None)
    if data is None:
        return
    columns = st.columns(len(_data.CATEGORIES))
    for column, (name, total) in zip(columns, data.totals.items(), strict=True):
        column.metric(name, f"{total:,}", border=True)
    st.caption(f"{data.events:,} events from {_ui.when(data.first)} to {_ui.when(data.last)}; "
               f"chart in {data.bucket} buckets (UTC).")
    left, right = st.columns([3, 1])
    with left, st.container(border=True):
        st.markdown("**Activity over time**")
        if data.series:
            st.altair_chart(_activity_chart(data.series, data.bucket), width="stretch")
        else:
            st.info("No events yet.")
    with right:
        _integrity_status(mw)


def _minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


_TIME_FORMATS = {"minute": "%H:%M", "hour": "%b %d %H:00", "day": "%b %d"}


def _activity_chart(series: list[dict[str, Any]], bucket: str) -> alt.Chart:
    """One bar per bucket, labelled once (a time axis would repeat a minute's label per tick)."""
    frame = pd.DataFrame(series)
    frame["bucket"] = [t.strftime(_TIME_FORMATS[bucket]) for t in frame["time"]]
    names = [n for n in COLORS if n in set(frame["category"])]
    return alt.Chart(frame).mark_bar().encode(
        x=alt.X("bucket:O", title=None, sort=None,
                axis=alt.Axis(labelAngle=0, labelOverlap=True)),
        y=alt.Y("sum(count):Q", title="events"),
        color=alt.Color("category:N", title=None, sort=names, scale=alt.Scale(
            domain=names, range=[COLORS[n] for n in names]), legend=alt.Legend(orient="top")),
        tooltip=["bucket:O", "category:N", "count:Q"],
    ).properties(height=320)


def _integrity_status(mw: Any) -> None:
    last = _ui.verifications()
    with st.container(border=True):
        st.markdown("**Hash-chain integrity**")
        if last.report is None:
            st.info("Not verified since the dashboard started.", icon=":material/help:")
        elif last.report.ok:
            st.success(f"Intact: {last.report.checked:,} events verified.",
                       icon=":material/verified:")
        else:
            brk = last.report.first_break
            assert brk is not None
            st.error(f"Broken at position {brk.position}: {brk.reason}", icon=":material/gpp_bad:")
        if last.at is not None:
            st.caption(f"Checked {_ui.when(last.at)} by {last.by}.")
        st.page_link("views/integrity.py", label="Verify now", icon=":material/verified:")


def _scope(tenant: str | None) -> str:
    return "all tenants" if tenant is None else f"tenant **{tenant}**"


# -- audit trail --------------------------------------------------------------------------


def audit() -> None:
    mw, tenant = _ui.viewer(), _ui.tenant_in_focus()
    _heading("Audit trail", "Who read or changed which memory, when and why: newest first, "
                            "filtered and paged in the database. Never memory content.")
    query = _audit_filters(tenant)
    cursors: list[int] = st.session_state.setdefault(AUDIT_CURSORS, [0])
    page = _ui.guarded(lambda: _audit_page(mw, query, cursors[-1]), default=None)
    if page is None:
        return
    if not page.rows:
        st.info("No events match these filters.", icon=":material/filter_alt_off:")
        return
    st.caption(f"Page {len(cursors)}: {len(page.rows)} events, positions "
               f"{page.rows[-1]['position']} to {page.rows[0]['position']}.")
    st.dataframe(
        pd.DataFrame(page.rows, columns=_data.AUDIT_COLUMNS), hide_index=True,
        width="stretch", key="audit_table", column_config={
            "position": st.column_config.NumberColumn("#", format="%d", width="small"),
            "recorded_at": "recorded (UTC)", "on_behalf_of": "on behalf of",
            "detail": st.column_config.TextColumn("detail", width="large")})
    controls = st.columns(4)
    if controls[0].button("Newer", icon=":material/chevron_left:", disabled=len(cursors) == 1,
                          width="stretch"):
        cursors.pop()
        st.rerun()
    if controls[1].button("Older", icon=":material/chevron_right:",
                          disabled=page.older is None, width="stretch"):
        cursors.append(page.older or 0)
        st.rerun()
    controls[2].download_button("CSV of this page", _data.rows_as_csv(page.rows),
                                "memwarden-audit.csv", "text/csv", icon=":material/download:",
                                width="stretch")
    controls[3].download_button("JSON of this page", _data.rows_as_json(page.rows),
                                "memwarden-audit.json", "application/json",
                                icon=":material/download:", width="stretch")
    memories = list(dict.fromkeys(row["memory"] for row in page.rows if row["memory"]))
    if memories:
        left, right = st.columns([3, 1], vertical_alignment="bottom")
        chosen = left.selectbox("Open a memory of this page", memories, key="audit_open")
        if right.button("Open memory", icon=":material/open_in_new:", width="stretch"):
            open_memory(chosen)


def _audit_filters(tenant: str | None) -> _data.AuditQuery:
    current: _data.AuditQuery = st.session_state.get(AUDIT_QUERY) or _data.AuditQuery(
        cube_id=st.query_params.get(MEMORY_PARAM))
    with st.form("audit_filters"), st.container():
        first = st.columns(3)
        actor = first[0].text_input("Actor", current.actor or "", placeholder="e.g. agent:triage")
        cube_id = first[1].text_input("Memory id", current.cube_id or "",
                                      placeholder="reads and changes of one memory")
        types = first[2].multiselect("Event types", _data.EVENT_TYPES, list(current.types),
                                     placeholder="any type")
        second = st.columns(3)
        today = datetime.now(UTC).date()
        since = second[0].date_input("From (UTC)", current.since.date() if current.since else None,
                                     max_value=today + timedelta(days=1), format="YYYY-MM-DD")
        until = second[1].date_input("To (UTC, inclusive)",
                                     (current.until - timedelta(days=1)).date()
                                     if current.until else None, format="YYYY-MM-DD")
        second[2].markdown(f"Tenant: {_scope(tenant)}")
        applied = st.form_submit_button("Apply filters", type="primary",
                                        icon=":material/filter_alt:")
    query = _data.AuditQuery(tenant=tenant, actor=actor.strip() or None,
                             cube_id=cube_id.strip() or None, types=tuple(types),
                             since=_start_of(since), until=_start_of(until, days=1))
    if applied or query.tenant != current.tenant:
        st.session_state[AUDIT_QUERY] = query
        st.session_state[AUDIT_CURSORS] = [0]
        return query
    return current


def _start_of(day: date | None, *, days: int = 0) -> datetime | None:
    if day is None:
        return None
    return datetime.combine(day, time(), UTC) + timedelta(days=days)


def open_memory(cube_id: str) -> None:
    st.session_state[MEMORY_PARAM] = cube_id
    st.switch_page("views/memory.py", query_params={MEMORY_PARAM: cube_id})


# -- memory detail ------------------------------------------------------------------------


def memory() -> None:
    mw, tenant = _ui.viewer(), _ui.tenant_in_focus()
    _heading("Memory detail", "Every version with who, when and why; compare any two; see it "
                              "as of any moment; roll it back (a new version: nothing is "
                              "rewritten).")
    cube_id = _memory_picker(mw, tenant)
    if not cube_id:
        return
    detail = _ui.guarded(lambda: _data.memory_detail(mw, cube_id), default=None)
    if detail is None:
        return
    _memory_card(detail)
    if not detail.history_visible:
        st.info("Your role may not see this memory's history.", icon=":material/lock:")
        return
    timeline, compare, as_of, roll_back, touched = st.tabs(
        [":material/timeline: Timeline", ":material/compare: Compare versions",
         ":material/schedule: As of a time", ":material/undo: Roll back",
         ":material/manage_search: Who touched it"])
    with timeline:
        st.dataframe(pd.DataFrame(_data.timeline_rows(detail.versions)), hide_index=True,
                     width="stretch")
    with compare:
        _compare(detail)
    with as_of:
        _as_of(mw, detail)
    with roll_back:
        _roll_back(mw, detail)
    with touched:
        page = _ui.guarded(lambda: _audit_page(mw, _data.AuditQuery(cube_id=cube_id), 0),
                           default=None)
        if page is not None:
            st.dataframe(pd.DataFrame(page.rows, columns=_data.AUDIT_COLUMNS), hide_index=True,
                         width="stretch")


def _memory_picker(mw: Any, tenant: str | None) -> str | None:
    asked = st.query_params.get(MEMORY_PARAM) or st.session_state.get(MEMORY_PARAM) or ""
    choices = _ui.guarded(lambda: _choices(mw, tenant), default=[])
    ids = [m.cube_id for m in choices]
    left, right = st.columns([2, 1])
    typed = left.text_input("Memory id", asked, placeholder="paste an id, or pick one")
    picked = right.selectbox("…or pick one", ["", *ids], index=0,
                             format_func=lambda i: i or f"{len(ids)} memories",
                             help="The first memories of the tenant you may see, in id order.")
    cube_id = (picked or typed).strip()
    if cube_id and cube_id != asked:
        st.session_state[MEMORY_PARAM] = cube_id
        st.query_params[MEMORY_PARAM] = cube_id
    return cube_id or None


def _memory_card(detail: _data.MemoryDetail) -> None:
    state = detail.state
    with st.container(border=True):
        st.subheader(_ui.literal(state.cube_id))
        st.markdown(" ".join([
            f":blue-badge[tenant {state.tenant}]", f":violet-badge[owner {state.owner}]",
            f":gray-badge[{state.kind}]", f":green-badge[version {state.version}]",
            f":red-badge[{state.state}]" if state.deleted else ":green-badge[active]",
            *[f":orange-badge[{label}]" for label in state.labels]]))
        if detail.content_visible:
            st.text(state.text)  # as written: never parsed as Markdown
        else:
            st.info("Content withheld: your role may see this memory's metadata and history, "
                    "not its text.", icon=":material/visibility_off:")
        columns = st.columns(4)
        columns[0].metric("Reads", detail.usage.read_count)
        columns[1].metric("Writes", detail.usage.write_count)
        columns[2].metric("Last read by", detail.usage.last_read_by or "—")
        columns[3].metric("Versions", len(detail.versions) or state.version)
        st.caption(f"Created {_ui.when(state.created_at)} by {_ui.literal(state.created_by)}; "
                   f"last changed {_ui.when(state.updated_at)} by "
                   f"{_ui.literal(state.updated_by)} ({state.last_event}); "
                   f"last read {_ui.when(detail.usage.last_read_at)}.")
        with st.expander("Metadata"):
            st.json(dict(state.metadata))


def _version_choice(detail: _data.MemoryDetail, label: str, default: int, key: str) -> int:
    versions = {v.state.version: v for v in _data.content_versions(detail.versions)}
    numbers = list(versions)
    return st.selectbox(label, numbers, index=numbers.index(default), key=key,
                        format_func=lambda n: _version_label(versions[n], detail.content_visible))


def _version_label(version: Any, content_visible: bool) -> str:
    state = version.state
    label = f"v{state.version} · {state.last_event} by {state.updated_by}"
    if content_visible and "text" in state.changed:
        text = state.text if len(state.text) <= 60 else state.text[:57] + "…"
        label += f" · “{text}”"
    return label


def _last_different(detail: _data.MemoryDetail) -> int:
    """The latest version whose content differs from the current one (else the one before)."""
    versions = _data.content_versions(detail.versions)
    current = versions[-1].state
    for version in reversed(versions[:-1]):
        if (version.state.text, version.state.metadata) != (current.text, current.metadata):
            return version.state.version
    return versions[-2].state.version


def _compare(detail: _data.MemoryDetail) -> None:
    versions = _data.content_versions(detail.versions)
    if len(versions) < 2:
        st.info("This memory's content has one version.")
        return
    latest = versions[-1].state.version
    left, right = st.columns(2)
    with left:
        old = _version_choice(detail, "From version", _last_different(detail), "diff_from")
    with right:
        new = _version_choice(detail, "To version", latest, "diff_to")
    states = {v.state.version: v for v in detail.versions}
    diff = _data.side_by_side(states[old].state, states[new].state,
                              content_visible=detail.content_visible)
    left, right = st.columns(2)
    for column, number, body in ((left, old, diff.before_html), (right, new, diff.after_html)):
        version = states[number]
        with column, st.container(border=True):
            st.markdown(f"**Version {number}** · {version.state.last_event} by "
                        f"{_ui.literal(version.state.updated_by)}")
            st.html(f"<div class='mw-diff'>{body}</div>{_DIFF_STYLE}")
            st.caption(_ui.literal(version.reason) if version.reason else "no reason given")
    if diff.metadata:
        st.markdown("**Metadata changes**")
        st.dataframe(pd.DataFrame(diff.metadata), hide_index=True, width="stretch")
    elif old != new:
        st.caption("Metadata is the same in both versions.")


_DIFF_STYLE = """<style>
.mw-diff { font-size: 1.05rem; line-height: 1.6; white-space: pre-wrap; }
.mw-diff del { background: #fde2e1; color: #8b1a1a; text-decoration: line-through; }
.mw-diff ins { background: #dcf5e3; color: #14532d; text-decoration: none; }
</style>"""


def _as_of(mw: Any, detail: _data.MemoryDetail) -> None:
    created = detail.state.created_at
    columns = st.columns(3)
    day = columns[0].date_input("Date (UTC)", created.date(), key="as_of_day")
    moment = columns[1].time_input("Time (UTC)", created.time().replace(microsecond=0),
                                   key="as_of_time", step=60)
    columns[2].caption("Replayed from the log: the memory exactly as it was then.")
    at = datetime.combine(day, moment, UTC) + timedelta(seconds=59)
    then = _ui.guarded(lambda: _data.state_as_of(mw, detail, at), default=None)
    if then is None:
        st.info(f"No version of this memory existed at {_ui.when(at)}.")
        return
    _state_summary(then, detail.content_visible)


def _state_summary(state: MemoryState, content_visible: bool) -> None:
    with st.container(border=True):
        st.markdown(f"**Version {state.version}** ({state.state}) · {state.last_event} by "
                    f"{_ui.literal(state.updated_by)} at {_ui.when(state.updated_at)}")
        if content_visible and not text_withheld(state):
            st.text(state.text)  # as written: never parsed as Markdown
        else:
            st.caption("Text withheld.")
        st.json(dict(state.metadata), expanded=False)


def _roll_back(mw: Any, detail: _data.MemoryDetail) -> None:
    state = detail.state
    if not detail.may_rollback:
        st.info(f"Your role (`{mw.principal.role}`) may not roll memories back; a compliance "
                "officer may.", icon=":material/lock:")
        return
    if state.deleted:
        st.info("The memory is deleted: restore it before rolling it back.")
        return
    versions = _data.content_versions(detail.versions)
    earlier = [v.state.version for v in versions[:-1]]
    if not earlier:
        st.info("There is no other version to roll back to.")
        return
    pending = st.session_state.get(PENDING_ROLLBACK)
    if pending and pending["cube_id"] == state.cube_id:
        _confirm_rollback(mw, pending)
        return
    labelled = {v.state.version: v for v in versions}
    with st.form("rollback"):
        to_version = st.selectbox(
            "Roll back to version", earlier, index=earlier.index(_last_different(detail)),
            format_func=lambda n: _version_label(labelled[n], detail.content_visible))
        reason = st.text_area("Reason (required, recorded in the audit trail)",
                              placeholder="e.g. the update was based on a wrong inference")
        asked = st.form_submit_button("Roll back…", icon=":material/undo:")
    if asked:
        if not reason.strip():
            st.error("A reason is required: it is recorded with the rollback.",
                     icon=":material/edit_note:")
            return
        st.session_state[PENDING_ROLLBACK] = {
            "cube_id": state.cube_id, "to_version": to_version, "reason": reason.strip(),
            "expected_version": state.version}
        st.rerun()
    if done := st.session_state.pop("rollback_done", None):
        st.success(done, icon=":material/check_circle:")


def _confirm_rollback(mw: Any, pending: dict[str, Any]) -> None:
    with st.container(border=True):
        st.warning(
            f"Roll back **{pending['cube_id']}** to version {pending['to_version']}? This "
            f"appends version {pending['expected_version'] + 1} with the content of version "
            f"{pending['to_version']}, recorded as a MemoryRolledBack event by "
            f"**{mw.principal.subject}** with the reason: “{pending['reason']}”.",
            icon=":material/warning:")
        confirm, cancel, _ = st.columns([2, 1, 3])
        if confirm.button("Confirm rollback", type="primary", icon=":material/check:"):
            st.session_state.pop(PENDING_ROLLBACK, None)
            with _ui.shown_errors(), st.spinner("Rolling back; the new version is scanned "
                                                 "for personal data…"):
                new = _data.rollback(mw, pending["cube_id"], pending["to_version"],
                                     reason=pending["reason"],
                                     expected_version=pending["expected_version"])
                _ui.after_write()
                st.session_state["rollback_done"] = (
                    f"Rolled back: the memory has the content of version "
                    f"{pending['to_version']} again (now at version {new.version}).")
                st.rerun()
        if cancel.button("Cancel", icon=":material/close:"):
            st.session_state.pop(PENDING_ROLLBACK, None)
            st.rerun()


# -- access decisions ---------------------------------------------------------------------


def access() -> None:
    mw, tenant = _ui.viewer(), _ui.tenant_in_focus()
    _heading("Access decisions", f"Reads and denials by actor in {_scope(tenant)}: every "
                                 "decision of the access policy is in the log.")
    data = _ui.guarded(lambda: _access(mw, tenant), default=None)
    if data is None:
        return
    columns = st.columns(3)
    for column, title, counts, what in (
            (columns[0], "Reads by actor", data.summary.readers, "reads"),
            (columns[1], "Top readers of sensitive memories", data.summary.sensitive_readers,
             "reads"),
            (columns[2], "Denials by actor", data.summary.denied, "denials")):
        with column, st.container(border=True):
            st.markdown(f"**{title}**")
            if not counts:
                st.caption("None.")
                continue
            _ranked([{"actor": c.actor, what: c.count, "memories": c.memories}
                     for c in counts], what)
    st.markdown("**Recent denials**")
    if data.recent_denials:
        st.dataframe(pd.DataFrame(data.recent_denials), hide_index=True,
                     width="stretch")
    else:
        st.caption("No request has been denied.")


def _ranked(rows: list[dict[str, Any]], value: str) -> None:
    """A table whose ``value`` column is drawn as bars (readable with one row or fifty)."""
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", column_config={
        value: st.column_config.ProgressColumn(value, format="%d", min_value=0,
                                               max_value=max(r[value] for r in rows))})


# -- integrity ----------------------------------------------------------------------------


def integrity() -> None:
    mw = _ui.viewer()
    _heading("Integrity", "Recompute the SHA-256 hash chain over the whole event log: any "
                          "edited, deleted or reordered event breaks it, and the first break "
                          "is named.")
    last = _ui.verifications()
    if st.button("Verify the hash chain", type="primary", icon=":material/verified:"):
        bar = st.progress(0.0, text="Verifying…")

        def progress(checked: int, head: int) -> None:
            bar.progress(min(1.0, checked / head) if head else 1.0,
                         text=f"Verified {checked:,} of {head:,} events")

        with _ui.shown_errors():
            report = _data.verify(mw, progress)
            bar.progress(1.0, text=f"Verified {report.checked:,} events")
            with last.lock:
                last.report, last.at, last.by = report, datetime.now(UTC), mw.actor
    if last.report is None:
        st.info("Not verified since the dashboard started.", icon=":material/help:")
        return
    report = last.report
    if report.ok:
        st.success(f"The chain is intact: {report.checked:,} events verified, up to position "
                   f"{report.head_position:,}.", icon=":material/verified:")
    else:
        brk = report.first_break
        assert brk is not None
        st.error(f"The chain is broken at position {brk.position} (event {brk.event_id}): "
                 f"{brk.reason}. {report.checked:,} events before it are intact.",
                 icon=":material/gpp_bad:")
    st.caption(f"Checked {_ui.when(last.at)} by {last.by}.")


# -- sensitive data -----------------------------------------------------------------------

_sensitive = _ui.cached(_data.sensitive_data)


def sensitive() -> None:
    mw, tenant = _ui.viewer(), _ui.tenant_in_focus()
    _heading("Sensitive data", f"Personal data Presidio found on write in {_scope(tenant)}: "
                               "entity types, offsets and scores, never the values.")
    data = _ui.guarded(lambda: _sensitive(mw, tenant), default=None)
    if data is None:
        return
    if not data.rows:
        st.info("No personal data has been found in this scope.", icon=":material/check:")
        return
    columns = st.columns(3)
    columns[0].metric("Memories with findings", f"{len(data.rows):,}", border=True)
    columns[1].metric("Findings (current versions)", f"{sum(data.by_type.values()):,}",
                      border=True)
    columns[2].metric("Entity types", len(data.by_type), border=True)
    if data.partial:
        st.caption(f"Counted over the first {data.scanned:,} scans; narrow the tenant to see "
                   "all.")
    left, right = st.columns([1, 2])
    with left, st.container(border=True):
        st.markdown("**Findings by entity type**")
        _ranked([{"entity type": k, "findings": v} for k, v in data.by_type.items()],
                "findings")
    with right, st.container(border=True):
        st.markdown("**By memory** (latest scan of each)")
        st.dataframe(pd.DataFrame(data.rows), hide_index=True, width="stretch", height=300)
    with st.container(border=True):
        st.markdown("**Text as your role sees it**")
        chosen = st.selectbox("Memory", [row["memory"] for row in data.rows],
                              key="sensitive_memory")
        if st.button("Show its text", icon=":material/visibility:"):
            seen = _ui.guarded(lambda: _data.text_as_seen(mw, chosen), default=None)
            if seen is not None and seen.text is None:
                st.info(f"Your role (`{mw.principal.role}`) sees findings, never content.",
                        icon=":material/visibility_off:")
            elif seen is not None:
                badge = (":green-badge[shown in clear: you may read sensitive data]" if seen.clear
                         else ":orange-badge[masked: your role may not read sensitive data]")
                st.markdown(badge)
                st.text(seen.text)  # as written (masks included): never parsed as Markdown
                st.caption("This read is recorded in the audit trail.")


# -- retention ----------------------------------------------------------------------------

_retention = _ui.cached(_data.retention)


def retention() -> None:
    mw, tenant = _ui.viewer(), _ui.tenant_in_focus()
    _heading("Retention", f"Rules, what falls due, legal holds and sweeps in {_scope(tenant)}. "
                          "Every retention action is an event; a hold overrides every rule.")
    days = st.select_slider("Window (days before and after now)", [7, 30, 90, 365], value=30)
    # The report plans a bounded number of memories' schedules before it counts (the rest
    # wait for the next report or sweep): say what is happening, and what is not planned yet.
    with st.spinner("Counting what falls due…"):
        data = _ui.guarded(lambda: _retention(mw, tenant, days), default=None)
    if data is None:
        return
    report = data.report
    if report.unplanned:
        st.info(f"{report.unplanned:,} memories are not yet planned under the current rules "
                f"and facts (schedule planned through log position {report.planned_through:,}): "
                "they count under their previous due dates until the next report or sweep "
                "plans them.", icon=":material/schedule:")
    columns = st.columns(4)
    columns[0].metric("Rules", len(data.rules), border=True)
    columns[1].metric(f"Due in {days} days", f"{sum(_due_total(r) for r in report.due):,}",
                      border=True)
    columns[2].metric(f"Done in the last {days} days",
                      f"{sum(int(r.get('count', 0)) for r in report.done):,}", border=True)
    columns[3].metric("Legal holds in force", report.holds, border=True)
    rules, due, holds, sweeps = st.tabs([":material/rule: Rules", ":material/event: Due and done",
                                         ":material/gavel: Legal holds",
                                         ":material/cleaning_services: Sweeps and dry run"])
    with rules:
        st.dataframe(pd.DataFrame([_flat(r) for r in data.rules]), hide_index=True,
                     width="stretch")
    with due:
        st.markdown("**Falls due** (by rule and outcome; held: blocked by a legal hold)")
        _table_or(report.due, "Nothing falls due in this window.")
        st.markdown("**Done**")
        _table_or(report.done, "No retention action in this window.")
        st.markdown("**Latest actions**")
        _table_or(report.recent, "None.")
    with holds:
        _holds(mw, tenant, data.holds)
    with sweeps:
        st.markdown("**Last sweeps**")
        _table_or([_flat(s) for s in report.sweeps], "No sweep has run yet.")
        _dry_run(mw, tenant)


def _due_total(row: dict[str, Any]) -> int:
    return sum(v for k, v in row.items() if isinstance(v, int) and k not in ("held",))


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """A row whose nested values (a rule's match, tiers...) read as text in one cell."""
    return {k: v if isinstance(v, str | int | float | type(None)) else _as_text(v)
            for k, v in row.items()}


def _as_text(value: Any) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_as_text(v)}" for k, v in value.items() if v is not None)
    if isinstance(value, list | tuple | set | frozenset):
        return ", ".join(_as_text(v) for v in value)
    return str(value)


def _table_or(rows: list[dict[str, Any]], empty: str) -> None:
    if rows:
        st.dataframe(pd.DataFrame([_flat(r) for r in rows]), hide_index=True, width="stretch")
    else:
        st.caption(empty)


def _holds(mw: Any, tenant: str | None, holds: list[dict[str, Any]]) -> None:
    _table_or(holds, "No legal hold has been placed.")
    if done := st.session_state.pop("hold_done", None):
        st.success(done, icon=":material/check_circle:")
    left, right = st.columns(2)
    with left, st.form("place_hold", clear_on_submit=True):
        st.markdown("**Place a legal hold**")
        scope = st.segmented_control("On", ["memory", "owner", "tenant"], default="memory")
        target = st.text_input("Memory id, or owner (data subject)",
                               help="Leave empty to hold the whole tenant.")
        case_id = st.text_input("Case id")
        reason = st.text_area("Reason (required, recorded)", key="hold_reason")
        placed = st.form_submit_button("Place hold", icon=":material/gavel:")
    if placed:
        with _ui.shown_errors():
            hold = mw.place_hold(
                reason=reason, case_id=case_id,
                memory=target.strip() or None if scope == "memory" else None,
                owner=target.strip() or None if scope == "owner" else None,
                tenant=tenant if scope != "memory" else None)
            _ui.after_write()
            st.session_state["hold_done"] = f"Hold {hold.hold_id} placed on {hold.scope} " \
                                            f"{hold.target}."
            st.rerun()
    active = [h for h in holds if not h.get("released_at")]
    with right, st.form("release_hold", clear_on_submit=True):
        st.markdown("**Release a legal hold**")
        hold_id = st.selectbox("Hold", [h["hold_id"] for h in active],
                               format_func=lambda i: next(
                                   f"{h['hold_id']} · {h['scope']} {h['target']} · case "
                                   f"{h['case_id']}" for h in active if h["hold_id"] == i))
        why = st.text_area("Reason (required, recorded)", key="release_reason")
        released = st.form_submit_button("Release hold", icon=":material/lock_open:",
                                         disabled=not active)
    if released and hold_id:
        with _ui.shown_errors():
            mw.release_hold(hold_id, reason=why)
            _ui.after_write()
            st.session_state["hold_done"] = f"Hold {hold_id} released."
            st.rerun()


def _dry_run(mw: Any, tenant: str | None) -> None:
    st.markdown("**Dry run**: what a sweep would do now, changing nothing.")
    if not st.button("Run a dry run", icon=":material/science:"):
        return
    bar = st.progress(0.0, text="Examining memories…")

    def progress(examined: int, due: int) -> None:
        bar.progress(min(1.0, examined / due) if due else 1.0,
                     text=f"Examined {examined:,} of {due:,} memories due")

    report = _ui.guarded(lambda: _data.dry_run(mw, tenant, progress), default=None)
    if report is None:
        return
    bar.progress(1.0, text=f"Examined {report.examined:,} memories")
    counts = dict(report.counts)
    st.success(f"A sweep now would act on {sum(counts.values()):,} memories: "
               + (", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing")
               + ".", icon=":material/science:")
    if report.actions:
        st.dataframe(pd.DataFrame([_flat(a.as_dict()) for a in report.actions[:500]]),
                     hide_index=True, width="stretch")


# -- erasures -----------------------------------------------------------------------------

_erasures = _ui.cached(_data.erasures)


def erasures() -> None:
    mw, tenant = _ui.viewer(), _ui.tenant_in_focus()
    _heading("Erasures", f"Subjects and memory contents erased in {_scope(tenant)} "
                         "(crypto-shredding), with the evidence each left.")
    data = _ui.guarded(lambda: _erasures(mw, tenant), default=None)
    if data is None:
        return
    subjects = [r for r in data.rows if r["type"] == "SubjectErased"]
    columns = st.columns(3)
    columns[0].metric("Subject erasures", len(subjects), border=True)
    columns[1].metric("Memory contents erased", len(data.rows) - len(subjects), border=True)
    columns[2].metric("Keys destroyed", sum(r["keys_destroyed"] or 0 for r in subjects),
                      border=True)
    if not data.rows:
        st.info("Nothing has been erased in this scope. `memwarden erase SUBJECT --tenant T "
                "--reason ...` (or retention's erase-after) erases; each erasure shows here "
                "with its evidence.", icon=":material/info:")
        return
    st.caption("Status: done. An erasure is one event: the subject's key is destroyed and every "
               "read model purged in the same step; the evidence below is what it recorded.")
    st.dataframe(pd.DataFrame(data.rows), hide_index=True, width="stretch")
    if data.partial:
        st.caption(f"The first {len(data.rows):,} erasures.")


# -- lineage ------------------------------------------------------------------------------

_artifacts = _ui.cached(_data.artifacts)


def lineage() -> None:
    mw, tenant = _ui.viewer(), _ui.tenant_in_focus()
    _heading("Lineage", "Parametric (LoRA adapter) and activation (KV cache) memories, the exact "
                        "memory versions each was built from, and the taints that block them.")
    rows = _ui.guarded(lambda: _artifacts(mw, tenant), default=None)
    if rows is None:
        return
    if not rows:
        st.info("No parametric or activation memory has been built in this scope.")
        return
    tainted = [r for r in rows if r["status"] == "tainted"]
    columns = st.columns(3)
    columns[0].metric("Artifacts", len(rows), border=True)
    columns[1].metric("Tainted", len(tainted), border=True)
    columns[2].metric("Sources", sum(r["sources"] for r in rows), border=True)
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    chosen = st.selectbox("Trace", [r["memory"] for r in rows], key="lineage_of",
                          help="An artifact's memory id: what it is made of.")
    trace = _ui.guarded(lambda: _data.lineage(mw, chosen), default=None)
    if trace is not None:
        for artifact in trace["artifacts"]:
            with st.container(border=True):
                st.markdown(f"**{artifact['kind']}** `{artifact['artifact'][:16]}` · "
                            f"status {artifact.get('status', '')}")
                st.dataframe(pd.DataFrame(artifact.get("sources", [])), hide_index=True,
                             width="stretch")
                if artifact.get("taints"):
                    st.error("Tainted: " + "; ".join(
                        f"{t['cause']} of {t['source_cube_id']} v{t['source_version']}"
                        for t in artifact["taints"]), icon=":material/warning:")
