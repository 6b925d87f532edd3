"""storage.image.* and storage.volume.* handlers.

Images are fetched into the host's cache (with progress replies, the one event Cattle treats
progress as a keepalive for). A VM's volumes are created with the VM and deleted by purge,
named from its instance uuid, so the volume events have nothing left to do on this host; they
are answered, never ignored, so the controller's processes complete.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from agent.dispatcher import HandlerError
from agent.protocol.events import Event, make_progress_reply
from agent.spec.image import parse_checksum
from drivers.base import Hypervisor

Publish = Callable[[dict[str, Any]], Awaitable[None]]


class StorageHandlers:
    def __init__(self, driver: Hypervisor, publish: Publish) -> None:
        self.driver = driver
        self.publish = publish

    async def image_activate(self, event: Event) -> dict[str, Any]:
        data = event.data or {}
        mapping = data.get("imageStoragePoolMap") or {}
        image = mapping.get("image") if isinstance(mapping, dict) else None
        if not isinstance(image, dict):
            raise HandlerError("data.imageStoragePoolMap.image: missing")
        reference = image.get("url") or image.get("name") or image.get("uuid")
        if not isinstance(reference, str) or not reference:
            raise HandlerError("data.imageStoragePoolMap.image.url: missing")
        checksum = None
        if image.get("checksum"):
            try:
                checksum = parse_checksum(str(image["checksum"]))
            except ValueError as exc:
                raise HandlerError(f"data.imageStoragePoolMap.image.checksum: {exc}") from None

        async def progress(percent: int, message: str) -> None:
            if event.replyTo:
                await self.publish(make_progress_reply(event, percent, message))

        return await self.driver.ensure_image(reference, checksum, progress)

    async def volume_event(self, event: Event) -> dict[str, Any]:
        data = event.data or {}
        if not isinstance(data.get("volumeStoragePoolMap"), dict):
            raise HandlerError("data.volumeStoragePoolMap: missing")
        return {}
