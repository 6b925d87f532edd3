"""`herdsman run`: wires the controller client, the dispatcher, the handlers and the driver."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from typing import Any

from agent.check.startup import log_host_checks
from agent.config import AgentConfig, host_uuid, secret
from agent.dispatcher import Dispatcher, Publish, Route
from agent.handlers.compute import ComputeHandlers
from agent.handlers.migrate import MigrateHandlers
from agent.handlers.ping import PingHandler
from agent.handlers.storage import StorageHandlers
from agent.health.reporter import client_post
from agent.health.wiring import HealthSupervisor
from agent.heap import HeapTrimmer
from agent.metrics import AgentMetrics, MetricsServer, Scraper
from agent.protocol.client import ControllerClient, basic_auth
from agent.protocol.container_events import ContainerEventSender
from agent.restarts.notices import RestartNotices
from agent.restarts.runner import RestartRunner
from agent.streams.actions import BaseUrl, StreamActions, default_stream_url
from agent.streams.auth import TokenVerifier, read_public_key
from agent.streams.console import ConsoleHandler
from agent.streams.exec import ExecHandler
from agent.streams.logs import LogsHandler
from agent.streams.proxy import ProxyHandler
from agent.streams.server import Handler, StreamRefused, StreamServer
from agent.systemd import Notifier
from drivers.base import DriverError, HostEvent, NotFound, Unavailable
from drivers.libvirt import threads
from drivers.libvirt.domxml.inputs import HostPolicy
from drivers.libvirt.driver import LibvirtDriver
from drivers.libvirt.host_dirs import make_dir
from drivers.libvirt.layout import HostLayout
from drivers.libvirt.published_ports import port_publisher

log = logging.getLogger("herdsman")


def build_driver(config: AgentConfig) -> LibvirtDriver:
    layout = HostLayout(state_dir=config.state_dir, log_dir=config.log_dir, storage_pool=config.storage_pool)
    policy = HostPolicy(layout=layout, network=config.network, bridge=config.bridge,
                        vnc_secret=secret(config, "vnc"))
    threads.configure(workers=max(16, 2 * config.concurrency), timeout=config.libvirt_timeout)
    ports = port_publisher(config.libvirt_uri, port_range=config.port_range, table=config.ports_table)
    driver = LibvirtDriver(config.libvirt_uri, policy=policy, domain_type=config.domain_type,
                           logger=logging.getLogger("herdsman.libvirt"), open_timeout=min(30.0, config.libvirt_timeout),
                           ports=ports)
    driver.migrations.configure(max_outgoing=config.migration_max_outgoing, bandwidth=config.migration_bandwidth,
                                progress_timeout=config.migration_progress_timeout,
                                completion_timeout=config.migration_completion_timeout,
                                postcopy=config.migration_postcopy)
    return driver


def build_routes(driver: LibvirtDriver, config: AgentConfig, host: str, publish: Publish,
                 stream_url: BaseUrl | None = None) -> dict[str, Route]:
    compute = ComputeHandlers(driver, stop_timeout=config.stop_timeout)
    storage = StorageHandlers(driver, publish)
    ping = PingHandler(driver, host_uuid=host, storage_path=str(config.state_dir))
    migrate = MigrateHandlers(driver, publish, host_uuid=host)
    streams = StreamActions(driver, host_uuid=host, secret=secret(config, "streams"),
                            base_url=stream_url or (lambda: config.stream_url))
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
        "compute.instance.migrate": Route(migrate.migrate, serial=False),
        "compute.instance.migrate.cancel": Route(migrate.cancel, serial=False),
        "compute.instance.console": Route(streams.console),
        "compute.instance.execute": Route(streams.execute),
        "compute.instance.logs": Route(streams.logs),
        "compute.instance.proxy": Route(streams.proxy),
        "storage.image.activate": Route(storage.image_activate, heavy=True),
        "storage.volume.activate": Route(storage.volume_event),
        "storage.volume.deactivate": Route(storage.volume_event),
        "storage.volume.remove": Route(storage.volume_event),
    }


def build_stream_routes(driver: LibvirtDriver, config: AgentConfig) -> dict[str, Handler]:
    return {
        "console": ConsoleHandler(driver),
        "exec": ExecHandler(driver),
        "logs": LogsHandler(driver),
        "proxy": ProxyHandler(driver),
    }


def stream_ssl_context(config: AgentConfig) -> ssl.SSLContext | None:
    if config.stream_cert is None:
        if config.stream_key is not None:
            raise SystemExit("herdsman run: --stream-key needs --stream-cert")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.stream_cert, config.stream_key)
    except (OSError, ssl.SSLError) as exc:
        raise SystemExit(f"herdsman run: --stream-cert/--stream-key: {exc}") from None
    return context


class Agent:
    """One agent process: everything runs on one asyncio loop."""

    def __init__(self, config: AgentConfig, *, host_checks: bool = False) -> None:
        """`host_checks`: run `herdsman check` in the background at start and log the results
        (the daemon does; tests that start many agents need not)."""
        if not config.url:
            raise SystemExit("herdsman run: --url / CATTLE_URL is required")
        self.config = config
        self.host_checks = host_checks
        make_dir(config.state_dir)  # missing parents too, traversable for qemu whatever the umask
        self.host_uuid = host_uuid(config)
        self.driver = build_driver(config)
        # only the agent finishes migrations an earlier run left (a debug command never does: it
        # would abort the migration when it exits)
        self.driver.migrations.recovers = True
        # The restart policy: the driver reports stops and adoptions to the runner. Connect a
        # listener of "VM restarted by the policy" with vm_restarted_listeners.append(fn(uuid)).
        self.restart_notices = RestartNotices(self._send_container_event, self.host_uuid)
        self.vm_restarted_listeners = self.restart_notices.listeners
        self.restarts = RestartRunner(self.driver.restarts, on_restarted=self.restart_notices,
                                      logger=logging.getLogger("herdsman.restarts"))
        self.driver.restarts.runner = self.restarts
        self.stream_verifier = TokenVerifier(self.host_uuid, local_secret=secret(config, "streams"))
        self.streams = StreamServer(config.stream_listen, self.stream_verifier, build_stream_routes(self.driver, config),
                                    ssl_context=stream_ssl_context(config), instance_check=self._stream_instance,
                                    logger=logging.getLogger("herdsman.streams"))
        self._stream_url: str | None = None
        self.own_metrics = AgentMetrics()
        self.health = HealthSupervisor(self.driver, host_uuid=self.host_uuid, state_dir=config.state_dir)
        self.vm_restarted_listeners.append(self.health.vm_restarted)  # healthy → reinitializing
        routes = build_routes(self.driver, config, self.host_uuid, self._publish, self.stream_url)
        self.dispatcher = Dispatcher(self.health.wrap(routes),
                                     self._publish, concurrency=config.concurrency, on_outcome=self.own_metrics.event_handled)
        self.client = ControllerClient(config.url, config.access_key, config.secret_key,
                                       event_names=self.dispatcher.event_names)
        self.container_events = ContainerEventSender(self.client.post_container_event, log)
        self.metrics = MetricsServer(config.metrics_listen, Scraper(
            self.driver.domain_stats, events=self.own_metrics, health_of=self.health.health_of,
            controller=self.client, streams=self.streams,
            images=self.driver.provisioner.images, stream_kinds=tuple(self.streams.routes)).scrape,
        ) if config.metrics_listen else None
        self.notifier = Notifier.from_environ()
        self.heap = HeapTrimmer()
        self._subscribed_once = False

    def stream_url(self) -> str | None:
        """Where users' clients reach the stream server; None while it is not running."""
        return self._stream_url if self.streams.running else None

    async def _stream_instance(self, instance_uuid: str) -> None:
        try:
            await self.driver.require_vm(instance_uuid)
        except NotFound:
            raise StreamRefused(404, f"no virtual machine {instance_uuid} on this host") from None
        except Unavailable as exc:
            raise StreamRefused(503, str(exc)) from None

    async def _start_streams(self) -> None:
        try:
            await self.streams.start()
        except OSError as exc:  # the VMs still need managing: run on, without streams
            log.error("stream server could not listen; console, exec, logs and proxy are unavailable",
                      extra={"listen": self.config.stream_listen, "error": str(exc)})
            return
        self._stream_url = self.config.stream_url or await asyncio.to_thread(  # may resolve the controller's name
            default_stream_url, self.streams.host, self.streams.port, tls=self.streams.ssl_context is not None,
            controller_url=self.config.url)
        log.info("stream server ready", extra={"url": self._stream_url})

    async def _start_metrics(self) -> None:
        if self.metrics is None:
            return
        try:
            await self.metrics.start()
        except OSError as exc:  # metrics are for the operator; the VMs still need managing
            log.error("metrics endpoint could not listen", extra={"listen": self.config.metrics_listen, "error": str(exc)})

    async def _load_controller_key(self, source: str) -> None:
        """Fetch the controller's token key, retrying (capped backoff) until it works: until
        then only tokens the agent minted itself open streams."""
        delay = 1.0
        while True:
            try:
                self.stream_verifier.set_public_key(await read_public_key(source))
                log.info("controller token key loaded", extra={"source": source})
                return
            except Exception as exc:  # unreachable controller, bad file: say so, try again
                log.warning("controller token key not loaded; retrying",
                            extra={"source": source, "error": str(exc), "retryIn": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)

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
        self._send_container_event(body)

    def _send_container_event(self, body: dict[str, Any]) -> None:
        self.container_events.send(body)

    def _on_libvirt(self, up: bool) -> None:
        if up:  # an adoption has just read every domain: give its garbage back
            self.heap.soon()
        self.notifier.status("libvirt connected" if up else f"libvirt at {self.config.libvirt_uri} unavailable, reconnecting")

    async def _on_subscribed(self) -> None:
        if not self._subscribed_once:
            self._subscribed_once = True
            self.notifier.ready("subscribed to the controller")
        else:
            self.notifier.status("subscribed to the controller")
            self.health.resend()  # a report lost while the controller was away heals now
        log.info("subscribed", extra={"url": self.config.url, "events": len(self.dispatcher.event_names)})

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        self.driver.add_event_listener(self._on_host_event)
        self.driver.add_availability_listener(self._on_libvirt)
        self.notifier.status("connecting to libvirt")
        try:
            await self.driver.start()
        except DriverError as exc:  # a host the agent must not run on as it is (see the message)
            raise SystemExit(f"herdsman run: {exc}") from None
        log.info("agent starting", extra={"hostUuid": self.host_uuid, "libvirt": self.config.libvirt_uri,
                                          **self.driver.host_facts()})
        self.health.start(client_post(self.client, basic_auth(*self.config.health_keys)))
        await self._start_streams()
        await self._start_metrics()
        tasks = [
            asyncio.create_task(self.client.run(self.dispatcher.on_frame, self._on_subscribed), name="controller"),
            asyncio.create_task(self.notifier.run_watchdog(), name="watchdog"),
            asyncio.create_task(self.heap.run(), name="heap-trim"),
        ]
        if self.host_checks:
            tasks.append(asyncio.create_task(log_host_checks(self.config, profile=self.driver.profile_or_none),
                                             name="host-check"))
        if self.config.controller_public_key:
            tasks.append(asyncio.create_task(self._load_controller_key(self.config.controller_public_key), name="token-key"))
        try:  # the listening socket is closed even when run() is cancelled
            await stop.wait()
            log.info("stopping (running VMs keep running)")
            self.notifier.stopping()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.restarts.close()  # a restart still waiting stays pending in its record
            await self.container_events.close()
            await self.client.aclose()
            await self.driver.close()
        finally:
            for task in tasks:
                task.cancel()
            await self.restarts.close()
            await self.health.close()
            await self.streams.close()
            if self.metrics is not None:
                await self.metrics.close()
