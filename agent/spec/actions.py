"""Inputs of the virtualMachine actions (stop, execute, logs, proxy, setlabels, console)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from agent.spec.base import Argument, LabelKey, LabelValue, SpecModel


class InstanceStop(SpecModel):
    remove: bool | None = None
    #: seconds to wait for the guest to power off after the ACPI request before it is destroyed
    timeout: int | None = Field(default=None, ge=0, le=3600)


class ContainerExec(SpecModel):
    attach_stdin: bool = True
    attach_stdout: bool = True
    command: list[Argument] = Field(min_length=1, max_length=4096)
    #: For a VM, tty=true merges stderr into stdout and gives the command a terminal: a real one
    #: when the guest has util-linux `script`, else one emulated by the agent (agent/streams/exec.py).
    tty: bool = True


class ContainerLogs(SpecModel):
    follow: bool = True
    lines: int = Field(default=100, ge=0, le=1_000_000)


class ContainerProxy(SpecModel):
    port: int = Field(default=80, ge=1, le=65535)
    scheme: Literal["http", "https"] = "http"


class SetLabelsInput(SpecModel):
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=512)


class InstanceConsoleInput(SpecModel):
    """The console action: the serial console (default) or the graphical one (noVNC).

    The seed gives this input no fields; `kind` is herdsman's, and other keys a controller may
    add are ignored.
    """

    model_config = ConfigDict(extra="ignore")

    kind: Literal["serial", "vnc"] = "serial"
