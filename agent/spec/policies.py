"""Nested policy types of a virtualMachine: health check, restart policy, log config."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from agent.health.request_line import RequestLineError, parse_request_line
from agent.spec.base import Name, SpecModel
from agent.spec.errors import PathError

Millis = Annotated[int, Field(ge=0, le=86_400_000)]


class RecreateOnQuorumStrategyConfig(SpecModel):
    quorum: int = Field(ge=1, le=1000)


class InstanceHealthCheck(SpecModel):
    """Host-side TCP probe (or HTTP when requestLine is set) against the VM's primary address.

    Times are milliseconds, as in Rancher 1.x. requestLine is HAProxy's `option httpchk`
    argument (agent/health/request_line.py); empty or null means a TCP connect check.
    """

    name: Name | None = None
    port: int = Field(ge=1, le=65535)
    request_line: str | None = None
    interval: Millis = 2000
    response_timeout: Millis = 2000
    initializing_timeout: Millis = 60000
    reinitializing_timeout: Millis = 60000
    healthy_threshold: int = Field(default=2, ge=1, le=100)
    unhealthy_threshold: int = Field(default=3, ge=1, le=100)
    strategy: Literal["none", "recreate", "recreateOnQuorum"] = "recreate"
    recreate_on_quorum_strategy_config: RecreateOnQuorumStrategyConfig | None = None

    @field_validator("request_line")
    @classmethod
    def _request_line(cls, value: str | None) -> str | None:
        if value:
            try:
                parse_request_line(value)
            except RequestLineError as exc:
                raise ValueError(f"{value!r} is not an HTTP check request line: {exc}") from None
        return value

    @field_validator("interval")
    @classmethod
    def _interval(cls, value: int) -> int:
        if value < 100:
            raise ValueError("interval must be at least 100 ms")
        return value

    @model_validator(mode="after")
    def _quorum(self) -> "InstanceHealthCheck":
        has_config = self.recreate_on_quorum_strategy_config is not None
        if self.strategy == "recreateOnQuorum" and not has_config:
            raise PathError("recreateOnQuorumStrategyConfig", "strategy 'recreateOnQuorum' needs recreateOnQuorumStrategyConfig")
        if self.strategy != "recreateOnQuorum" and has_config:
            raise PathError(
                "recreateOnQuorumStrategyConfig", "recreateOnQuorumStrategyConfig only goes with strategy 'recreateOnQuorum'"
            )
        return self


class RestartPolicy(SpecModel):
    """What happens when the guest stops without being asked to (docker's names)."""

    name: Literal["no", "always", "on-failure", "unless-stopped"] = "no"
    maximum_retry_count: int = Field(default=0, ge=0, le=10000)

    @model_validator(mode="after")
    def _retries(self) -> "RestartPolicy":
        if self.maximum_retry_count and self.name != "on-failure":
            raise PathError("maximumRetryCount", "maximumRetryCount only applies to restartPolicy 'on-failure'")
        return self


class LogConfig(SpecModel):
    """Where the serial console log goes.

    `file` (alias `json-file`, docker's default name) keeps it in a file written by virtlogd,
    which rotates it by its own global settings; `none` keeps no log. Per-VM rotation keys are
    refused rather than silently ignored, because virtlogd cannot apply them per domain.
    """

    driver: Literal["file", "json-file", "none"] | None = None
    config: dict[str, str] | None = None

    @field_validator("config")
    @classmethod
    def _no_keys(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value:
            keys = ", ".join(sorted(value))
            raise ValueError(
                f"options {keys} are not supported: the serial log is rotated by virtlogd "
                "(max_size and max_backups in virtlogd.conf), not per VM"
            )
        return value

    @property
    def keeps_log(self) -> bool:
        return self.driver != "none"
