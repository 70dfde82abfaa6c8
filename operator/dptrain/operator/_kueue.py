"""Kueue: queue labels on the workloads, suspended creation, and the ``Queued`` phase (pure).

How dptrain works with Kueue (https://kueue.sigs.k8s.io):

- Labels of a DPTrainingJob (``kueue.x-k8s.io/queue-name``, ``kueue.x-k8s.io/priority-class``
  and the user's own) are copied to its workloads — the trainer Job or JobSet and the
  data-preparation Job — which Kueue manages through its ``batch/job`` and
  ``jobset.x-k8s.io/jobset`` integrations. The user's labels (not Kueue's: with Kueue's pod
  integration a queue label on a pod would make Kueue manage the pod on its own) also go on the
  pod templates. The operator's own label keys always win.
- A workload of a job with a queue name is created with ``spec.suspend: true``, as Kueue
  expects: Kueue admits it (quota, flavours, priority) and unsuspends it. The operator never
  writes ``spec.suspend`` of an existing workload, so it never unsuspends what Kueue suspended
  (at admission or on preemption).
- Any suspended workload — ours, or one Kueue's webhook suspended because the cluster runs it
  with ``manageJobsWithoutQueueName: true`` — makes the job ``Queued`` with
  ``Admitted=False`` (reason ``KueuePending``): no progress is expected, so no stall clock runs
  and no restart is counted. Once unsuspended the job is ``Running`` (``Admitted=True``) and
  the stall clock starts at admission.
- A multi-host TPU JobSet gets ``alpha.jobset.sigs.k8s.io/exclusive-topology:
  cloud.google.com/gke-nodepool``: JobSet places each replicated Job on a node pool of its own
  (one TPU slice), which is also what Kueue's TAS / GKE expect of multi-host slices.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from dptrain.api._pod_overrides import RESERVED_KEY_PREFIXES, RESERVED_KEYS
from dptrain.operator._conditions import find
from dptrain.operator._draft import Decision, StatusDraft

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
KUEUE_PREFIX = "kueue.x-k8s.io/"
EXCLUSIVE_TOPOLOGY = "alpha.jobset.sigs.k8s.io/exclusive-topology"
NODE_POOL_LABEL = "cloud.google.com/gke-nodepool"
PENDING = "KueuePending"


def propagated_labels(job_labels: Mapping[str, str] | None) -> dict[str, str]:
    """The job's labels its workloads carry: all but the operator's and controllers' keys."""
    out: dict[str, str] = {}
    for key, value in (job_labels or {}).items():
        if key.startswith(KUEUE_PREFIX) or not (
            key in RESERVED_KEYS or key.startswith(RESERVED_KEY_PREFIXES)
        ):
            out[str(key)] = str(value)
    return out


def queue_name(job_labels: Mapping[str, str] | None) -> str | None:
    """The Kueue LocalQueue the job names (None: not queued by label)."""
    name = (job_labels or {}).get(QUEUE_LABEL)
    return str(name) if name else None


def _templates(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload.get("spec") or {}
    if workload.get("kind") == "JobSet":
        return [job["template"]["spec"]["template"] for job in spec.get("replicatedJobs", [])]
    return [spec["template"]] if "template" in spec else []


def for_queue(
    workload: dict[str, Any], job_labels: Mapping[str, str] | None, *, multi_host_tpu: bool = False
) -> dict[str, Any]:
    """``workload`` (a Job or JobSet) with the job's labels, suspended if queued (a copy)."""
    out = copy.deepcopy(workload)
    labels = propagated_labels(job_labels)
    meta = out.setdefault("metadata", {})
    meta["labels"] = {**labels, **(meta.get("labels") or {})}
    pod_labels = {k: v for k, v in labels.items() if not k.startswith(KUEUE_PREFIX)}
    for template in _templates(out):
        template_meta = template.setdefault("metadata", {})
        template_meta["labels"] = {**pod_labels, **(template_meta.get("labels") or {})}
    if queue_name(job_labels) is not None:
        out["spec"]["suspend"] = True  # Kueue admits it by unsuspending it
    if multi_host_tpu and out.get("kind") == "JobSet":
        meta["annotations"] = {
            **(meta.get("annotations") or {}),
            EXCLUSIVE_TOPOLOGY: NODE_POOL_LABEL,
        }
    return out


# ------------------------------------------------------------------------------ decisions


def hold(d: StatusDraft, what: str, *, requeue_after: float | None = None) -> Decision:
    """The job's ``what`` workload is suspended: ``Queued``, ``Admitted=False``, no stall clock."""
    labels = (d.original_meta or {}).get("labels") or {}
    queue = queue_name(labels)
    if queue is not None:
        message = (
            f"the {what} waits for admission by Kueue in LocalQueue {queue} (if it never "
            "comes: is Kueue running, and does that LocalQueue exist in this namespace?)"
        )
    else:
        message = (
            f"the {what} is suspended, waiting for admission (Kueue with "
            "manageJobsWithoutQueueName, or another admission controller)"
        )
    d.condition("Admitted", "False", PENDING, message, event="Normal")
    d.condition("Running", "False", "Queued", message)
    d.set_phase("Queued", PENDING, message)
    return d.finish(requeue_after=requeue_after)


def note_admitted(d: StatusDraft) -> None:
    """The workload runs: ``Admitted=True`` where the job was waiting for admission."""
    admitted = find(d.conditions, "Admitted")
    if admitted is not None and admitted.status != "True":
        d.condition(
            "Admitted",
            "True",
            "Admitted",
            "the workload was admitted and unsuspended",
            event="Normal",
        )


def queued_at_creation(d: StatusDraft) -> bool:
    """Whether a workload created now starts suspended (the job names a Kueue queue)."""
    return queue_name((d.original_meta or {}).get("labels") or {}) is not None
