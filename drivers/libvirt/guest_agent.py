"""qemu-guest-agent (QGA) through libvirt, and guest processes whose output streams while they run.

Every QGA command is built with ``json.dumps`` from plain values (KubeVirt's ``fmt.Sprintf``
QGA commands are the counter-example), and a user's command reaches the guest's shell only as
positional arguments of a fixed script, or, for ``script -c`` which takes one command line,
quoted by ``shlex.join``. Calls go through ``libvirt_qemu.qemuAgentCommand`` on a libvirt worker
thread (drivers.libvirt.threads) like every libvirt call here; each is a short round trip (2-10
ms under TCG) with a bounded timeout, so a hung agent costs a worker thread, never the event
loop, and an agent that is not running fails at once (libvirt knows the channel is
disconnected).

Why a :class:`GuestProcess` is more than ``guest-exec`` + ``guest-exec-status``: QGA returns a
command's captured output only once it has exited (and keeps at most 16 MiB), and takes stdin
only as one blob at start. To stream, the command runs under a fixed ``/bin/sh`` wrapper whose
stdout/stderr go to files the agent created and opened *before* starting it, and which the
wrapper unlinks at once (the agent's open handles keep them readable, so nothing is left
behind); the agent reads them with ``guest-file-read`` while polling ``guest-exec-status``
with backoff. Interactive stdin goes through a fifo the wrapper creates: the agent holds one
handle that it never writes (so the command sees end-of-file only when the agent closes
stdin) and one it writes through in chunks of at most PIPE_BUF. qemu-ga opens files
non-blocking, so a write into a full pipe fails with EAGAIN and poisons that handle (stdio's
error flag is sticky); nothing of an atomic PIPE_BUF write was delivered then, so the agent
reopens the writer and sends the same chunk again after a pause — lossless, and the client
is slowed down instead of buffered without limit.

Limits: the guest needs ``/bin/sh``, ``mkfifo`` (for stdin) and a writable ``/tmp`` (Linux
guests; not Windows). The output files are only freed when the command ends, so a command that
writes gigabytes fills the guest's ``/tmp`` meanwhile. The read position is kept by qemu-ga's
stdio handle; if a guest's libc made end-of-file sticky, output would still arrive complete,
but only when the command ends (a seek before the final read clears it).
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import shlex
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import libvirt
import libvirt_qemu
from lxml import etree

from drivers.base import GuestAgentError, GuestAgentUnavailable, GuestStream
from drivers.libvirt import threads

AGENT_NOT_RUNNING = "the guest agent is not running in this VM"
AGENT_CHANNEL = "org.qemu.guest_agent.0"
PIPE_BUF = 4096
READ_CHUNK = 64 * 1024

#: The wrapper every streamed command runs under. Fixed text: the user's command only ever
#: arrives as positional arguments ("$@"), never inside the script.
WRAPPER = r'''p=$1 m=$2 i=$3
shift 3
if [ "$m" = merged ]; then exec >>"$p.out" 2>&1; else exec >>"$p.out" 2>>"$p.err"; fi
rm -f "$p.out" "$p.err"
if [ "$i" = 1 ]; then
  mkfifo -m 600 "$p.in" || exit 126
  exec <"$p.in"
else
  exec </dev/null
fi
command -v "$1" >/dev/null 2>&1 || { printf '%s: command not found\n' "$1" >&2; exit 127; }
exec "$@"'''
#: Tells whether the guest has util-linux `script`, which gives a command a real terminal.
PROBE_PTY = "script --version 2>/dev/null | grep -q util-linux && echo pty || echo pipe"

Stream = GuestStream


class GuestAgent:
    """QGA commands of one domain, each a short round trip on a libvirt worker thread."""

    def __init__(self, dom: libvirt.virDomain, *, timeout: int = 10) -> None:
        self.dom = dom
        self.timeout = timeout

    async def connected(self) -> bool | None:
        """The agent channel's state from the live XML: True/False, None if libvirt doesn't say."""
        root = etree.fromstring((await threads.call(self.dom.XMLDesc, 0)).encode())
        for target in root.iterfind(f"devices/channel/target[@name='{AGENT_CHANNEL}']"):
            state = target.get("state")
            return None if state is None else state == "connected"
        return False

    async def call(self, command: str, **arguments: Any) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        try:
            reply = await threads.call(libvirt_qemu.qemuAgentCommand, self.dom, json.dumps(message), self.timeout, 0,
                                       timeout=self.timeout + 5, what=f"guest agent {command}")
        except libvirt.libvirtError as exc:
            raise self._error(command, exc) from None
        try:
            return json.loads(reply).get("return")
        except (ValueError, AttributeError):
            raise GuestAgentError(f"guest agent: {command} answered something that is not JSON") from None

    def _error(self, command: str, exc: libvirt.libvirtError) -> GuestAgentError:
        code, text = exc.get_error_code(), exc.get_error_message() or str(exc)
        if code == libvirt.VIR_ERR_AGENT_UNRESPONSIVE:
            if "not connected" in text:
                return GuestAgentUnavailable(AGENT_NOT_RUNNING)
            return GuestAgentUnavailable(f"the guest agent in this VM did not answer within {self.timeout} s")
        if code == libvirt.VIR_ERR_OPERATION_INVALID:
            return GuestAgentError(f"the VM is not running ({text})")
        marker = f"'{command}': "
        return GuestAgentError(f"guest agent: {text.split(marker, 1)[-1]}")

    # -- the commands used here -------------------------------------------------------------
    async def exec(self, path: str, args: Sequence[str], *, capture: bool = False, input_data: bytes | None = None) -> int:
        arguments: dict[str, Any] = {"path": path, "arg": list(args), "capture-output": capture}
        if input_data:
            arguments["input-data"] = base64.b64encode(input_data).decode()
        return int((await self.call("guest-exec", **arguments))["pid"])

    async def exec_status(self, pid: int) -> dict[str, Any]:
        return dict(await self.call("guest-exec-status", pid=pid))

    async def open(self, path: str, mode: str) -> int:
        return int(await self.call("guest-file-open", path=path, mode=mode))

    async def read(self, handle: int, count: int = READ_CHUNK) -> tuple[bytes, bool]:
        reply = await self.call("guest-file-read", handle=handle, count=count)
        return base64.b64decode(reply.get("buf-b64", "")), bool(reply.get("eof"))

    async def write(self, handle: int, data: bytes) -> int:
        reply = await self.call("guest-file-write", handle=handle, **{"buf-b64": base64.b64encode(data).decode()})
        return int(reply["count"])

    async def flush(self, handle: int) -> None:
        await self.call("guest-file-flush", handle=handle)

    async def seek(self, handle: int, offset: int = 0, whence: str = "cur") -> None:
        await self.call("guest-file-seek", handle=handle, offset=offset, whence=whence)

    async def close(self, handle: int) -> None:
        try:
            await self.call("guest-file-close", handle=handle)
        except GuestAgentError:
            pass  # the guest forgot it already (agent restarted): nothing left to release

    async def run(self, argv: Sequence[str], *, timeout: float = 10.0) -> tuple[int, bytes]:
        """Run a short helper command to completion (batch); its exit code and stdout."""
        pid = await self.exec(argv[0], argv[1:], capture=True)
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            status = await self.exec_status(pid)
            if status.get("exited"):
                return exit_code(status), base64.b64decode(status.get("out-data", ""))
            if time.monotonic() > deadline:
                raise GuestAgentError(f"{argv[0]} did not finish within {timeout:g} s in the guest")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)


def exit_code(status: dict[str, Any]) -> int:
    """guest-exec-status → a shell-style exit code (128 + signal for a killed process)."""
    if status.get("signal") is not None:
        return 128 + int(status["signal"])
    return int(status.get("exitcode", 0))


class GuestProcess:
    """A command in the guest, its output read while it runs (see the module docstring).

    ``merge_stderr`` sends stderr into stdout (a terminal has one output); ``pty`` runs the
    command under util-linux ``script`` so it gets a real terminal in the guest (see
    :func:`guest_has_pty`).
    """

    def __init__(self, agent: GuestAgent, argv: Sequence[str], *, stdin: bool = False, merge_stderr: bool = False,
                 pty: bool = False, poll_min: float = 0.02, poll_max: float = 0.2) -> None:
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("the command must be a non-empty list of strings")
        self.agent = agent
        self.argv = ["script", "-qefc", shlex.join(argv), "/dev/null"] if pty else list(argv)
        self.stdin = stdin
        self.pty = pty
        self.merge_stderr = merge_stderr or pty
        self._poll = (poll_min, poll_max)
        self._prefix = f"/tmp/.herdsman-exec-{secrets.token_hex(8)}"
        self._handles: dict[Stream, int] = {}
        self._keeper: int | None = None  # holds the fifo open for writing: no early EOF
        self._writer: int | None = None
        self._helpers: list[int] = []  # pids of kill/rm helpers still to be reaped
        self._poke = asyncio.Event()
        self.pid: int | None = None
        self.exit_code: int | None = None

    async def start(self) -> None:
        """Create the output files, start the wrapper and, with stdin, open its fifo."""
        agent = self.agent
        self._handles["stdout"] = await agent.open(f"{self._prefix}.out", "w+")
        if not self.merge_stderr:
            self._handles["stderr"] = await agent.open(f"{self._prefix}.err", "w+")
        mode = "merged" if self.merge_stderr else "split"
        try:
            self.pid = await agent.exec("/bin/sh", ["-c", WRAPPER, "herdsman-exec", self._prefix, mode,
                                              "1" if self.stdin else "0", *self.argv])
        except GuestAgentError as exc:
            await self._release()
            raise GuestAgentError(f"cannot start a shell in the guest ({exc}); streaming exec needs /bin/sh") from None
        if self.stdin:
            await self._open_fifo()

    async def _open_fifo(self) -> None:
        """Wait for the wrapper's fifo (it is created a few ms after the start) and open it."""
        assert self.pid is not None
        delay = 0.005
        deadline = time.monotonic() + 10
        while True:
            try:
                self._keeper = await self.agent.open(f"{self._prefix}.in", "r+")
                self._writer = await self.agent.open(f"{self._prefix}.in", "r+")
                return
            except GuestAgentError as exc:
                if "No such file" not in str(exc) or time.monotonic() > deadline:
                    raise
            if (await self.agent.exec_status(self.pid)).get("exited"):
                return  # the wrapper failed before making the fifo: output() reports why
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def output(self) -> AsyncIterator[tuple[Stream, bytes]]:
        """Yield (stream, bytes) as the command writes them; sets ``exit_code`` at the end."""
        assert self.pid is not None, "start() first"
        poll_min, poll_max = self._poll
        delay = poll_min
        while True:
            got = False
            for name, handle in self._handles.items():
                data = await self._read_available(handle)
                if data:
                    got = True
                    yield name, data
            if got:
                delay = poll_min
            else:
                status = await self.agent.exec_status(self.pid)
                if status.get("exited"):
                    for name, handle in self._handles.items():
                        await self.agent.seek(handle)  # clears a sticky end-of-file in the guest's stdio
                        data = await self._read_available(handle)
                        if data:
                            yield name, data
                    self.exit_code = exit_code(status)
                    return
                await self._reap()
                self._poke.clear()
                try:
                    await asyncio.wait_for(self._poke.wait(), delay)
                    delay = poll_min  # input was sent: its echo or answer is likely soon
                except TimeoutError:
                    delay = min(delay * 1.5, poll_max)

    async def _read_available(self, handle: int) -> bytes:
        parts = []
        while True:
            data, eof = await self.agent.read(handle, READ_CHUNK)
            parts.append(data)
            if eof or len(data) < READ_CHUNK:
                return b"".join(parts)

    async def write(self, data: bytes) -> None:
        """Send ``data`` to the command's stdin; waits (backoff) while the command doesn't read."""
        view = memoryview(data)
        while view:
            chunk = bytes(view[:PIPE_BUF])
            await self._write_chunk(chunk)
            view = view[len(chunk):]
        self._poke.set()

    async def _write_chunk(self, chunk: bytes) -> None:
        delay = 0.02
        while True:
            if self._writer is None or self.exit_code is not None:
                raise GuestAgentError("the command's input is closed")
            try:
                if await self.agent.write(self._writer, chunk) == len(chunk):
                    await self.agent.flush(self._writer)
                    return
            except GuestAgentUnavailable:
                raise
            except GuestAgentError as exc:
                if "temporarily unavailable" not in str(exc) and "failed to write" not in str(exc):
                    raise
            # The pipe is full: nothing of this chunk went in, and the handle's error flag is
            # set for good. Take a fresh handle; the keeper stops the reader seeing an EOF.
            await self.agent.close(self._writer)
            self._writer = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
            self._writer = await self.agent.open(f"{self._prefix}.in", "r+")

    async def close_stdin(self) -> None:
        """End of input: the command reads end-of-file once it has read what was sent."""
        handles, self._writer, self._keeper = (self._writer, self._keeper), None, None
        for handle in handles:
            if handle is not None:
                await self.agent.close(handle)
        self._poke.set()

    async def signal(self, name: str) -> None:
        """Send a signal (``INT``, ``HUP``, ``KILL``...) to the command, if it still runs."""
        if self.pid is None or self.exit_code is not None:
            return
        if not name.isalnum():
            raise ValueError(f"bad signal name {name!r}")
        self._helpers.append(await self.agent.exec("/bin/sh", ["-c", 'kill -s "$1" "$2"', "herdsman-kill", name,
                                                         str(self.pid)]))

    async def _reap(self) -> None:
        """Collect finished helpers, or qemu-ga keeps their status for ever."""
        for pid in list(self._helpers):
            try:
                if (await self.agent.exec_status(pid)).get("exited"):
                    self._helpers.remove(pid)
            except GuestAgentError:
                self._helpers.remove(pid)

    async def close(self, *, wait: float = 2.0) -> None:
        """Release every guest handle, remove the fifo and reap helpers and the command.

        A command still running after ``wait`` seconds (one that ignored SIGHUP) is left to run.
        """
        try:
            await self.close_stdin()
            await self._release()
            if self.stdin and self.pid is not None:
                await self.agent.run(["rm", "-f", f"{self._prefix}.in"])
            reaped = self.pid is None or self.exit_code is not None
            deadline = time.monotonic() + wait
            while True:
                await self._reap()
                if not reaped:
                    assert self.pid is not None
                    reaped = bool((await self.agent.exec_status(self.pid)).get("exited"))
                if (reaped and not self._helpers) or time.monotonic() > deadline:
                    return
                await asyncio.sleep(0.05)
        except GuestAgentError:
            pass  # the agent went away: the guest reclaims everything when it restarts

    async def _release(self) -> None:
        handles = list(self._handles.values())
        self._handles.clear()
        for handle in handles:
            await self.agent.close(handle)


async def guest_has_pty(agent: GuestAgent) -> bool:
    """True when the guest has util-linux ``script``, which gives a command a real terminal."""
    try:
        code, out = await agent.run(["/bin/sh", "-c", PROBE_PTY], timeout=5)
    except GuestAgentUnavailable:
        raise
    except GuestAgentError:
        return False
    return code == 0 and out.strip() == b"pty"
