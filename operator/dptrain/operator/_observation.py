"""What the reconciler reads from Kubernetes objects, as the decision's plain records.

Pure functions over object bodies: a child Job's (or JobSet's) state, the trainer's ConfigMap,
a job's DatasetRef, and the fingerprint of what in a job's body can change a decision.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from dptrain.api import (
    CONFIG_FILE,
)
from dptrain.operator._conditions import parse_time
from dptrain.operator._draft import Decision
from dptrain.operator._ledger_record import ANNOTATION_LEDGER
from dptrain.operator._observed import ChildState, ConfigState
from dptrain.operator._spec_changes import ANNOTATION_APPLIED_SPEC


def child_state(obj: Mapping[str, Any] | None, owner_uid: str) -> tuple[ChildState | None, bool]:
    """Read a Job's (or JobSet's) state; the bool says it belongs to another incarnation."""
    if obj is None:
        return None, False
    meta = obj.get("metadata") or {}
    owners = [ref.get("uid") for ref in meta.get("ownerReferences") or []]
    foreign = owner_uid not in owners
    conditions = {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or []
                  if c.get("status") == "True"}
    failed = conditions.get("Failed")
    complete = conditions.get("Complete") or conditions.get("Completed")
    finished = complete or failed
    message = ""
    if failed is not None:
        message = ": ".join(filter(None, [failed.get("reason"), failed.get("message")]))
    state = ChildState(
        name=str(meta.get("name", "")),
        complete=complete is not None,
        failed=failed is not None,
        deleting=bool(meta.get("deletionTimestamp")) or foreign,
        suspended=(obj.get("spec") or {}).get("suspend") is True,
        message=message,
        created=parse_time(meta.get("creationTimestamp")),
        finished=parse_time(finished.get("lastTransitionTime")) if finished else None,
    )
    return state, foreign


def dataset_ref(body: Mapping[str, Any]) -> str | None:
    """``spec.data.datasetRef`` of a job body, if it names one."""
    ref = ((body.get("spec") or {}).get("data") or {}).get("datasetRef")
    return ref if isinstance(ref, str) and ref else None


def config_state(obj: Mapping[str, Any] | None) -> ConfigState | None:
    """The trainer's ConfigMap as the decision sees it (None: absent or being deleted)."""
    if obj is None or (obj.get("metadata") or {}).get("deletionTimestamp"):
        return None
    raw = (obj.get("data") or {}).get(CONFIG_FILE)
    try:
        config = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        config = None
    return ConfigState(config=config if isinstance(config, dict) else None,
                       immutable=obj.get("immutable") is True)


def fingerprint(body: Mapping[str, Any]) -> str:
    """What, in a job's body, can change a decision.

    ``status.privacy`` and the ledger annotation are included so that someone else's write of
    them is noticed; the reconciler records the fingerprint of the body *as it wrote it*, so its
    own writes do not trigger another pass.
    """
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    annotations = meta.get("annotations") or {}
    return repr((meta.get("generation"), meta.get("deletionTimestamp"), status.get("progress"),
                 status.get("dataset"), status.get("privacy"),
                 annotations.get(ANNOTATION_LEDGER),
                 annotations.get(ANNOTATION_APPLIED_SPEC) is None))


def body_after(body: Mapping[str, Any], decision: Decision) -> dict[str, Any]:
    """The job's body as it is once the decision's writes landed (for :func:`fingerprint`)."""
    meta = dict(body.get("metadata") or {})
    annotations = dict(meta.get("annotations") or {})
    if decision.ledger_annotation is not None:
        annotations[ANNOTATION_LEDGER] = decision.ledger_annotation
    if decision.applied_spec is not None:
        annotations[ANNOTATION_APPLIED_SPEC] = "set"
    meta["annotations"] = annotations
    status = dict(body.get("status") or {})
    status.update(decision.status)
    return {**body, "metadata": meta, "status": status}
