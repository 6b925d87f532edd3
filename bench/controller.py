"""The controller side of the benchmarks, in a process of its own.

The agent under test and the controller double would otherwise share one event loop and one
interpreter lock, and every millisecond the double spends serving /publish would be charged
to the agent. Cattle runs on another machine; a separate process is the closest this host
gets. The parent drives it with one JSON command per line on stdin and reads one JSON answer
per line on stdout:

    {"op": "wait_subscribed", "timeout": 30, "count": 1}
    {"op": "requests", "requests": [{"name", "data", "resourceType", "resourceId", ...}],
     "inflight": 100, "interval": 0, "timeout": 120}
    {"op": "stop"}

`requests` keeps `inflight` requests outstanding (or, with `interval` > 0, sends one every
`interval` seconds) and answers with, per request, the seconds from send to final reply,
the reply's size on the wire (its Content-Length) and its error message if it failed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, Self

from aiohttp import web

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.controller_double import ControllerDouble

REPO = Path(__file__).resolve().parents[1]
_LINE_LIMIT = 256 << 20


class TimedController(ControllerDouble):
    """The controller double, noting when each final reply arrived and its size.

    The double's own `wait_reply` rescans every reply for every waiter; with 100 requests in
    flight that is quadratic and would be measured as agent latency, so final replies are
    matched here, once, as they arrive.
    """

    def __init__(self) -> None:
        super().__init__()
        self._waiting: dict[str, asyncio.Future[tuple[float, dict[str, Any]]]] = {}
        self._sizes: dict[int, int] = {}
        self._seen = 0

    def expect(self, event_id: str) -> asyncio.Future[tuple[float, dict[str, Any]]]:
        future: asyncio.Future[tuple[float, dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._waiting[event_id] = future
        return future

    async def _json_body(self, request: web.Request) -> dict[str, Any] | web.Response:
        body = await super()._json_body(request)
        if isinstance(body, dict):
            self._sizes[id(body)] = request.content_length or 0
        return body

    async def _notify(self) -> None:
        now = time.perf_counter()
        for reply in self.replies[self._seen:]:
            size = self._sizes.pop(id(reply), 0)
            if reply.get("transitioning") == "yes":
                continue
            previous = reply.get("previousIds") or [None]
            future = self._waiting.pop(str(previous[0]), None)
            if future is not None and not future.done():
                reply["_bytes"] = size
                future.set_result((now, reply))
        self._seen = len(self.replies)
        await super()._notify()


async def _one(ctl: TimedController, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    extra = {k: v for k, v in spec.items() if k not in ("name", "data", "resourceType", "resourceId")}
    event = ctl.make_event(spec["name"], spec.get("data"), resource_type=spec.get("resourceType"),
                           resource_id=spec.get("resourceId"), **extra)
    future = ctl.expect(event["id"])
    started = time.perf_counter()
    if not await ctl.send(event):
        return {"seconds": None, "bytes": 0, "error": "no subscriber connected"}
    try:
        arrived, reply = await asyncio.wait_for(future, timeout)
    except TimeoutError:
        ctl._waiting.pop(event["id"], None)
        return {"seconds": None, "bytes": 0, "error": f"no reply within {timeout}s"}
    error = reply.get("transitioningMessage") if reply.get("transitioning") == "error" else None
    instances = sum(1 for r in (reply.get("data") or {}).get("resources") or [] if r.get("type") == "instance")
    return {"seconds": arrived - started, "bytes": reply["_bytes"], "error": error, "instances": instances}


async def run_requests(ctl: TimedController, specs: list[dict[str, Any]], *, inflight: int,
                       interval: float, timeout: float) -> dict[str, Any]:
    results: list[dict[str, Any] | None] = [None] * len(specs)
    started = time.perf_counter()
    if interval > 0:
        tasks = []
        for index, spec in enumerate(specs):
            tasks.append(asyncio.create_task(_one(ctl, spec, timeout)))
            if index + 1 < len(specs):
                await asyncio.sleep(interval)
        for index, task in enumerate(tasks):
            results[index] = await task
    else:
        queue = iter(range(len(specs)))

        async def worker() -> None:
            for index in queue:
                results[index] = await _one(ctl, specs[index], timeout)

        await asyncio.gather(*(worker() for _ in range(max(1, inflight))))
    return {"wall": time.perf_counter() - started, "results": results}


async def serve() -> None:
    ctl = TimedController()
    await ctl.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    _answer({"url": ctl.url})
    try:
        while line := await reader.readline():
            command = json.loads(line)
            op = command.get("op")
            if op == "stop":
                break
            if op == "wait_subscribed":
                await ctl.wait_subscribed(timeout=float(command.get("timeout", 30)), count=int(command.get("count", 1)))
                _answer({"ok": True})
            elif op == "requests":
                _answer(await run_requests(ctl, command["requests"], inflight=int(command.get("inflight", 1)),
                                           interval=float(command.get("interval", 0)),
                                           timeout=float(command.get("timeout", 120))))
            else:
                _answer({"error": f"unknown op {op!r}"})
    finally:
        await ctl.stop()


def _answer(value: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


class RemoteController:
    """The parent's handle on a `python -m bench.controller` process."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self._subscriptions = 0

    async def __aenter__(self) -> Self:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.controller", cwd=REPO, limit=_LINE_LIMIT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        self.url = (await self._read())["url"]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            try:
                await self._send({"op": "stop"})
                await asyncio.wait_for(self.proc.wait(), 10)
            except (TimeoutError, ConnectionError):
                self.proc.kill()
                await self.proc.wait()

    async def _send(self, command: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        await self.proc.stdin.drain()

    async def _read(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the controller process exited")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"controller process: {answer['error']}")
        return answer

    async def call(self, command: dict[str, Any]) -> dict[str, Any]:
        await self._send(command)
        return await self._read()

    async def wait_subscribed(self, timeout: float = 30) -> None:
        """Wait for the next agent's subscription (each agent started subscribes once)."""
        self._subscriptions += 1
        await self.call({"op": "wait_subscribed", "timeout": timeout, "count": self._subscriptions})

    async def requests(self, specs: list[dict[str, Any]], *, inflight: int = 1, interval: float = 0,
                       timeout: float = 120) -> dict[str, Any]:
        return await self.call({"op": "requests", "requests": specs, "inflight": inflight,
                                "interval": interval, "timeout": timeout})


if __name__ == "__main__":
    asyncio.run(serve())
