"""The conversion worker: keeps the artifacts the conversion policy's ``worker.scopes`` name built.

For each scope and kind it converts again when there is no artifact yet, when the current one is
tainted or retired, or when the selection no longer matches its sources; otherwise it does
nothing, so running it twice in a row converts at most once. ``memwarden convert run`` runs it
once (``--dry-run`` says what it would do); ``memwarden up`` (embedded mode) and ``memwarden
work`` (both modes) run it every ``worker.interval_seconds`` when scopes are configured.

It decides from read models (``READ_MODELS``): a pass first brings them up to the log's head as
it starts. Embedded, it applies what other processes wrote; distributed, where Kafka consumers
feed them, it waits until they have applied the log up to its start (``ReadModelsBehind``
after a minute), as a retention sweep does, so it never converts a memory deleted, held or
erased before it started, nor retrains an artifact it built last time and does not see yet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from governance import _lineage
from governance._conversion import ConversionPolicy, Selection
from governance._errors import MemWardenError
from governance._parametric import plan
from projections._lineage import READY

if TYPE_CHECKING:
    from governance._sdk import MemWarden

logger = logging.getLogger("memwarden.conversion")

READ_MODELS = ("cubes", "usage", "retention", "lineage")
"""What a pass reads: the candidates, their read counts, the legal holds, the artifacts."""


@dataclass(frozen=True, slots=True)
class ConversionAction:
    tenant: str
    owner: str | None
    kind: str
    cube_id: str
    outcome: str
    """``built``, ``would build``, ``up to date``, ``nothing selected``, ``skipped``, ``failed``."""
    why: str
    artifact: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "owner": self.owner, "kind": self.kind,
                "cube_id": self.cube_id, "outcome": self.outcome, "why": self.why,
                "artifact": self.artifact}


def run_conversions(mw: MemWarden, *, tenant: str | None = None, dry_run: bool = False,
                    policy: ConversionPolicy | None = None) -> list[ConversionAction]:
    """One pass over the scheduled scopes (of ``tenant``; all the principal may convert in)."""
    policy = policy or ConversionPolicy.load()
    only = mw.tenant_scope("artifact.convert", tenant)
    if policy.worker.scopes:
        fresh_read_models(mw)
    actions = []
    for scope in policy.worker.scopes:
        if only is not None and scope.tenant != only:
            continue
        for kind in scope.kinds:
            cube_id = _lineage.default_cube_id(kind, scope.tenant, scope.owner)
            action = _one(mw, policy, scope.tenant, scope.owner, kind, cube_id, dry_run)
            logger.info("conversion worker: %s %s: %s (%s)", kind, cube_id, action.outcome,
                        action.why)
            actions.append(action)
    return actions


def fresh_read_models(mw: MemWarden) -> None:
    """Bring the read models a pass reads up to the log's head now (see the module docstring)."""
    if mw._backend.project_synchronously:
        mw.projector.catch_up()
        return
    from projections._kafka_projector import KafkaFedRunner

    if isinstance(mw.projector, KafkaFedRunner):
        mw.projector.wait_until_applied(READ_MODELS)


def _one(mw: MemWarden, policy: ConversionPolicy, tenant: str, owner: str | None, kind: str,
         cube_id: str, dry_run: bool) -> ConversionAction:
    def action(outcome: str, why: str, artifact: str | None = None) -> ConversionAction:
        return ConversionAction(tenant, owner, kind, cube_id, outcome, why, artifact)

    try:
        selection = plan(mw, tenant=tenant, owner=owner, policy=policy)
        why = _why_stale(mw, kind, cube_id, selection)
        if why is None:
            return action("up to date", "the current artifact matches the selection")
        if why.startswith("its memory is"):
            return action("skipped", why)
        if not selection.selected:
            return action("nothing selected", why)
        if dry_run:
            return action("would build", why)
        reason = f"conversion worker: {why}"
        if kind == "parametric":
            from governance._parametric import convert_parametric

            built: Any = convert_parametric(mw, tenant=tenant, owner=owner, cube_id=cube_id,
                                            policy=policy, reason=reason)
        else:
            from governance._activation import convert_activation

            built = convert_activation(mw, tenant=tenant, owner=owner, cube_id=cube_id,
                                       policy=policy, reason=reason)
        return action("built", why, built.artifact)
    except MemWardenError as error:  # one scope's failure must not stop the others
        return action("failed", str(error))


def _why_stale(mw: MemWarden, kind: str, cube_id: str, selection: Selection) -> str | None:
    state = mw._backend.reads.cube(cube_id)
    if state is not None and state.state != "active":
        return f"its memory is {state.state}"
    lineage_reads = _lineage.queries(mw)
    digest = lineage_reads.current_artifact(cube_id, state.version) if state else None
    record = lineage_reads.artifact(digest) if digest else None
    if record is None:
        return "no artifact yet"
    if record.status != READY:
        return f"the current artifact is {record.status}"
    current = {(s.cube_id, s.version) for s in record.sources}
    wanted = {(c.state.cube_id, c.state.version) for c in selection.selected}
    # A KV cache holds the hottest memories that fit the model's context, not always all.
    if current != wanted if kind == "parametric" else not current <= wanted:
        return "the selection changed"
    return None
