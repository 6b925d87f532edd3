"""`herdsman run`: wires the controller client, the dispatcher, the handlers and the driver."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from agent.config import AgentConfig, host_uuid, secret
from agent.dispatcher import Dispatcher, Publish, Route
from agent.handlers.compute import ComputeHandlers
from agent.handlers.ping import PingHandler
from agent.handlers.storage import StorageHandlers
from agent.protocol.client import ControllerClient
from agent.systemd import Notifier
from drivers.base import HostEvent
from drivers.libvirt.domxml.inputs import HostPolicy
from drivers.libvirt.driver import LibvirtDriver
from drivers.libvirt.layout import HostLayout

log = logging.getLogger("herdsman")


def build_driver(config: AgentConfig) -> LibvirtDriver:
    layout = HostLayout(state_dir=config.state_dir, log_dir=config.log_dir, storage_pool=config.storage_pool)
    policy = HostPolicy(layout=layout, network=config.network, bridge=config.bridge,
                        vnc_secret=secret(config, "vnc"))
    return LibvirtDriver(config.libvirt_uri, policy=policy, domain_type=config.domain_type, logger=logging.getLogger("herdsman.libvirt"))


def build_routes(driver: LibvirtDriver, config: AgentConfig, host: str, publish: Publish) -> dict[str, Route]:
    compute = ComputeHandlers(driver, stop_timeout=config.stop_timeout)
    storage = StorageHandlers(driver, publish)
    ping = PingHandler(driver, host_uuid=host, storage_path=str(config.state_dir))
    return {
        "ping": Route(ping),
        "compute.instance.activate": Route(compute.activate, heavy=True),
        "compute.instance.deactivate": Route(compute.deactivate, heavy=True),
        "compute.instance.restart": Route(compute.restart, heavy=True),
        "compute.instance.remove": Route(compute.remove, heavy=True),
        "compute.instance.purge": Route(compute.purge, heavy=True),
        "compute.instance.force.stop": Route(compute.force_stop, heavy=True),
        "compute.instance.inspect": Route(compute.inspect),
        "compute.instance.setlabels": Route(compute.setlabels),
        "storage.image.activate": Route(storage.image_activate, heavy=True),
        "storage.volume.activate": Route(storage.volume_event),
        "storage.volume.deactivate": Route(storage.volume_event),
        "storage.volume.remove": Route(storage.volume_event),
    }


class Agent:
    """One agent process: everything runs on one asyncio loop."""

    def __init__(self, config: AgentConfig) -> None:
        if not config.url:
            raise SystemExit("herdsman run: --url / CATTLE_URL is required")
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.host_uuid = host_uuid(config)
        self.driver = build_driver(config)
        self.dispatcher = Dispatcher(build_routes(self.driver, config, self.host_uuid, self._publish), self._publish,
                                     concurrency=config.concurrency)
        self.client = ControllerClient(config.url, config.access_key, config.secret_key,
                                       event_names=self.dispatcher.event_names)
        self.notifier = Notifier.from_environ()
        self._background: set[asyncio.Task[Any]] = set()
        self._subscribed_once = False

    async def _publish(self, reply: dict[str, Any]) -> None:
        await self.client.publish(reply)

    def _on_host_event(self, event: HostEvent) -> None:
        body = {
            "externalId": event.external_id,
            "externalStatus": event.status,
            "externalTimestamp": int(event.timestamp),
            "reportedHostUuid": self.host_uuid,
        }
        log.info("host event", extra=body)
        task = asyncio.ensure_future(self._post_container_event(body))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _post_container_event(self, body: dict[str, Any]) -> None:
        try:
            await self.client.post_container_event(body)
        except Exception as exc:  # the next ping carries the state anyway
            log.warning("could not report host event", extra={"error": str(exc), **body})

    def _on_libvirt(self, up: bool) -> None:
        self.notifier.status("libvirt connected" if up else f"libvirt at {self.config.libvirt_uri} unavailable, reconnecting")

    async def _on_subscribed(self) -> None:
        if not self._subscribed_once:
            self._subscribed_once = True
            self.notifier.ready("subscribed to the controller")
        else:
            self.notifier.status("subscribed to the controller")
        log.info("subscribed", extra={"url": self.config.url, "events": len(self.dispatcher.event_names)})

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        self.driver.add_event_listener(self._on_host_event)
        self.driver.add_availability_listener(self._on_libvirt)
        self.notifier.status("connecting to libvirt")
        await self.driver.start()
        log.info("agent starting", extra={"hostUuid": self.host_uuid, "libvirt": self.config.libvirt_uri,
                                          **self.driver.host_facts()})
        tasks = [
            asyncio.create_task(self.client.run(self.dispatcher.on_frame, self._on_subscribed), name="controller"),
            asyncio.create_task(self.notifier.run_watchdog(), name="watchdog"),
        ]
        await stop.wait()
        log.info("stopping (running VMs keep running)")
        self.notifier.stopping()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.aclose()
        await self.driver.close()
