"""Validation errors as a user reads them: one line per problem, led by the field path."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError
from pydantic_core import ErrorDetails


@dataclass(frozen=True)
class FieldError:
    path: str  # "disks.0.size", or "" for a whole-object problem
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


def _message(error: ErrorDetails) -> str:
    text = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    if error["type"] == "extra_forbidden":
        text = "unknown field"
    return text


class PathError(ValueError):
    """A cross-field problem raised by a model validator, pinned to the field to change.

    pydantic reports a model validator's error at the model itself (an empty path); this
    carries the path of the field the user should edit, relative to that model.
    """

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


def field_errors(exc: ValidationError, prefix: str = "") -> list[FieldError]:
    out = []
    for error in exc.errors(include_url=False):
        # pydantic marks a failing dict key with a "[key]" step after it; the key is the path.
        loc = [str(part) for part in error["loc"] if part != "[key]"]
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, PathError) and cause.path:
            loc.append(cause.path)
        path = ".".join(loc)
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        out.append(FieldError(path=path, message=_message(error)))
    return out


class SpecError(ValueError):
    """A spec (or action input) that failed validation; str() names every failing field."""

    def __init__(self, errors: list[FieldError]):
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))

    @classmethod
    def from_validation(cls, exc: ValidationError, prefix: str = "") -> "SpecError":
        return cls(field_errors(exc, prefix))
