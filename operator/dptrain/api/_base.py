"""The API's names and the base models every resource is built from.

``GROUP``/``VERSION``/``PLURAL`` name the DPTrainingJob resource (the CRD, RBAC rules and the
pod contract's status path are built from them); ``_Model`` is the strict, frozen base of specs
(unknown fields rejected), ``_Status`` the tolerant base of statuses (written by controllers).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints, WithJsonSchema
from pydantic.alias_generators import to_camel

GROUP = "dptrain.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DPTrainingJob"
PLURAL = "dptrainingjobs"
SINGULAR = "dptrainingjob"
SHORT_NAMES = ("dptj",)

DEFAULT_TRAINER_IMAGE = "ghcr.io/dptrain/trainer:0.1.0"

# A DNS-1123 label: what Kubernetes requires of names that become labels and Service names.
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A POSIX path without NUL or line breaks (RE2-compatible: the API server uses Go regexps);
# '..' components are refused by `_no_parent_components` and by a CEL rule in the CRD.
SAFE_PATH_PATTERN = r"^[^\x00\n\r]+$"
SAFE_PATH_CEL = ("self != '..' && !self.startsWith('../') && !self.endsWith('/..') && "
                 "!self.contains('/../')")


def _no_parent_components(value: str) -> str:
    if ".." in value.split("/"):
        raise ValueError("must not contain '..' path components")
    return value


DnsLabel = Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN, max_length=63)]
SafePath = Annotated[
    str,
    StringConstraints(pattern=SAFE_PATH_PATTERN, min_length=1, max_length=1024),
    AfterValidator(_no_parent_components),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 1024,
                    "pattern": SAFE_PATH_PATTERN,
                    "x-kubernetes-validations": [
                        {"rule": SAFE_PATH_CEL, "message": "must not contain '..' path components"}
                    ]}),
]

Accelerator = Literal[
    "cpu",
    "nvidia-a100-80gb",
    "nvidia-h100-80gb",
    "nvidia-h200",
    "tpu-v5e",
    "tpu-v5p",
    "tpu-v6e",
]

Phase = Literal[
    "Pending",
    "Preparing",
    "Planned",
    "Queued",
    "Running",
    "Suspended",
    "Succeeded",
    "BudgetExhausted",
    "Failed",
]
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "BudgetExhausted", "Failed"})


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        use_attribute_docstrings=True,
        # Strict: `true` is not 1.0 and "2" is not 2. The API server sees JSON numbers; a
        # manifest with a string or a boolean where a number belongs is a mistake to report.
        strict=True,
    )


class _Status(BaseModel):
    """Status is written by controllers: tolerant of fields a newer version may add."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        frozen=True,
        allow_inf_nan=False,
        use_attribute_docstrings=True,
    )
