"""Serial console (with its log file unless logConfig says none), the guest-agent channel, VNC."""

from __future__ import annotations

from drivers.libvirt.domxml.inputs import RenderInput
from drivers.libvirt.domxml.model import Domain, Graphics, SerialConsole


def configure_serial(inp: RenderInput, dom: Domain) -> None:
    log = inp.spec.log_config
    keeps_log = log is None or log.keeps_log
    # virtlogd writes the log, so it survives agent restarts and is rotated by virtlogd.
    dom.serial = SerialConsole(log_file=str(inp.layout.console_log_path(inp.uuid)) if keeps_log else None)


def configure_guest_agent(inp: RenderInput, dom: Domain) -> None:
    dom.guest_agent_channel = True


def configure_graphics(inp: RenderInput, dom: Domain) -> None:
    # Bound to the host's loopback: the console action reaches it through the agent's stream
    # server, never directly; the password is a second lock for local users.
    dom.graphics = Graphics(listen=inp.policy.vnc_listen, password=inp.vnc_password())
