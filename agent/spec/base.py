"""Shared pydantic configuration for the resource models."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, StringConstraints
from pydantic.alias_generators import to_camel

from agent.spec import fields


class SpecModel(BaseModel):
    """Strict, immutable, camelCase on the wire (the API's names), snake_case in Python.

    Strict mode: a controller that sends "2" for an int has a bug we want to see, not hide.
    Unknown keys are refused so that a typo in a hand-written spec is an error, not a no-op.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        strict=True,
        extra="forbid",
        frozen=True,
    )

    def to_api(self) -> dict:
        """The JSON form with the API's field names, defaults included, None left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


Name = Annotated[str, StringConstraints(max_length=255), AfterValidator(lambda v: fields.check_text(v, single_line=True))]
Text = Annotated[str, StringConstraints(max_length=65536), AfterValidator(lambda v: fields.check_text(v, single_line=False))]
Hostname = Annotated[str, AfterValidator(fields.check_hostname)]
IpAddress = Annotated[str, AfterValidator(fields.check_ip)]
LabelKey = Annotated[str, AfterValidator(fields.check_label_key)]
LabelValue = Annotated[str, StringConstraints(max_length=4096), AfterValidator(lambda v: fields.check_text(v, single_line=False))]
#: A controller reference (an id such as 42 or '1ihm3'); ints are normalised to strings.
Reference = Annotated[
    str,
    BeforeValidator(lambda v: str(v) if isinstance(v, int) and not isinstance(v, bool) else v),
    StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$"),
]
Argument = Annotated[str, StringConstraints(max_length=4096), AfterValidator(lambda v: fields.check_text(v, single_line=True))]
