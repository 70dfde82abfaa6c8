"""Errors that name the field and the rule: one line per problem, never a traceback."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class FieldError:
    """One problem with one field of a manifest.

    Attributes:
        field: dotted path in the manifest's own (camelCase) spelling, e.g. ``spec.privacy.delta``.
        rule: the rule that was broken, phrased so it reads after the field name.
        value: a short rendering of the offending value, if any.
    """

    field: str
    rule: str
    value: str | None = None

    def __str__(self) -> str:
        got = f" (got {self.value})" if self.value is not None else ""
        return f"{self.field}: {self.rule}{got}"


class InvalidJobError(ValueError):
    """A DPTrainingJob manifest broke one or more rules.

    Attributes:
        errors: every problem found, in field order.
    """

    def __init__(self, errors: Iterable[FieldError]) -> None:
        self.errors: tuple[FieldError, ...] = tuple(errors)
        super().__init__("; ".join(str(e) for e in self.errors) or "invalid DPTrainingJob")

    @property
    def lines(self) -> Sequence[str]:
        """One human-readable line per problem."""
        return [str(e) for e in self.errors]


def short_repr(value: object, limit: int = 60) -> str:
    """A bounded rendering of a value for error messages (hostile input can be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
