"""Serialise the typed Domain model to libvirt domain XML with lxml (escaping is lxml's job)."""

from __future__ import annotations

import re

from lxml import etree

from drivers.libvirt.domxml import metadata
from drivers.libvirt.domxml.model import Disk, Domain, Interface

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# Characters XML 1.0 cannot carry at all; display-only text (title, description) replaces them.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def display_text(text: str) -> str:
    return _XML_ILLEGAL.sub("\ufffd", text)


def _sub(parent: etree._Element, tag: str, text: object | None = None, **attrs: object) -> etree._Element:
    element = etree.SubElement(parent, tag, {k: str(v) for k, v in attrs.items() if v is not None})
    if text is not None:
        element.text = str(text)
    return element


def _disk(devices: etree._Element, disk: Disk) -> None:
    node = _sub(devices, "disk", type=disk.source_type, device=disk.device)
    _sub(node, "driver", name="qemu", type=disk.driver_type, cache=disk.cache, discard=disk.discard)
    if disk.source_type == "volume":
        _sub(node, "source", pool=disk.pool, volume=disk.volume)
    else:
        _sub(node, "source", file=disk.file)
    _sub(node, "target", dev=disk.target_dev, bus=disk.bus)
    if disk.iotune:
        iotune = _sub(node, "iotune")
        for key in ("read_iops_sec", "write_iops_sec"):
            if key in disk.iotune:
                _sub(iotune, key, disk.iotune[key])
    if disk.boot_order is not None:
        _sub(node, "boot", order=disk.boot_order)
    if disk.readonly:
        _sub(node, "readonly")
    if disk.serial:
        _sub(node, "serial", disk.serial)


def _interface(devices: etree._Element, nic: Interface) -> None:
    node = _sub(devices, "interface", type=nic.type)
    _sub(node, "mac", address=nic.mac)
    if nic.type == "network":
        _sub(node, "source", network=nic.source)
    elif nic.type == "bridge":
        _sub(node, "source", bridge=nic.source)
    _sub(node, "model", type=nic.model)


def _devices(root: etree._Element, dom: Domain) -> None:
    devices = _sub(root, "devices")
    if dom.emulator:
        _sub(devices, "emulator", dom.emulator)
    for disk in dom.disks:
        _disk(devices, disk)
    if dom.scsi_controller:
        _sub(devices, "controller", type="scsi", index=0, model="virtio-scsi")
    for nic in dom.interfaces:
        _interface(devices, nic)
    if dom.serial is not None:
        serial = _sub(devices, "serial", type="pty")
        if dom.serial.log_file:
            _sub(serial, "log", file=dom.serial.log_file, append="on")
        _sub(serial, "target", port=0)
        console = _sub(devices, "console", type="pty")
        _sub(console, "target", type="serial", port=0)
    if dom.guest_agent_channel:
        channel = _sub(devices, "channel", type="unix")
        _sub(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    if dom.graphics is not None:
        graphics = _sub(devices, "graphics", type="vnc", port=-1, autoport="yes", passwd=dom.graphics.password)
        _sub(graphics, "listen", type="address", address=dom.graphics.listen)
        video = _sub(devices, "video")
        _sub(video, "model", type="vga")
    if dom.rng:
        rng = _sub(devices, "rng", model="virtio")
        _sub(rng, "backend", "/dev/urandom", model="random")
    if dom.panic:
        _sub(devices, "panic", model="isa")


def _os(root: etree._Element, dom: Domain) -> None:
    os_node = _sub(root, "os")
    _sub(os_node, "type", "hvm", arch=dom.os.arch, machine=dom.os.machine)
    for tag in ("kernel", "initrd", "cmdline"):
        value = getattr(dom.os, tag)
        if value is not None:
            _sub(os_node, tag, value)


def _tuning(root: etree._Element, dom: Domain) -> None:
    if dom.hard_limit_kib is not None:
        memtune = _sub(root, "memtune")
        _sub(memtune, "hard_limit", dom.hard_limit_kib, unit="KiB")
        if dom.swap_hard_limit_kib is not None:
            _sub(memtune, "swap_hard_limit", dom.swap_hard_limit_kib, unit="KiB")
    if dom.cpu_shares is not None:
        cputune = _sub(root, "cputune")
        _sub(cputune, "shares", dom.cpu_shares)


def to_element(dom: Domain) -> etree._Element:
    nsmap = {"qemu": QEMU_NS} if dom.qemu_args else None
    root = etree.Element("domain", {"type": dom.type}, nsmap=nsmap)
    _sub(root, "name", dom.name)
    _sub(root, "uuid", dom.uuid)
    if dom.title:
        _sub(root, "title", display_text(dom.title))
    if dom.description:
        _sub(root, "description", display_text(dom.description))
    if dom.metadata is not None:
        _sub(root, "metadata").append(metadata.metadata_element(dom.metadata))
    _sub(root, "memory", dom.memory_kib, unit="KiB")
    _sub(root, "currentMemory", dom.memory_kib, unit="KiB")
    _sub(root, "vcpu", dom.vcpu, placement="static", cpuset=dom.cpuset)
    _tuning(root, dom)
    _os(root, dom)
    features = _sub(root, "features")
    for name in dom.features:
        _sub(features, name)
    if dom.tcg_tb_cache_mib:
        tcg = _sub(features, "tcg")
        _sub(tcg, "tb-cache", dom.tcg_tb_cache_mib, unit="MiB")
    if dom.cpu_mode:
        _sub(root, "cpu", mode=dom.cpu_mode)
    clock = _sub(root, "clock", offset="utc")
    _sub(clock, "timer", name="rtc", tickpolicy="catchup")
    _sub(clock, "timer", name="pit", tickpolicy="delay")
    _sub(clock, "timer", name="hpet", present="no")
    _sub(root, "on_poweroff", dom.on_poweroff)
    _sub(root, "on_reboot", dom.on_reboot)
    _sub(root, "on_crash", dom.on_crash)
    _devices(root, dom)
    if dom.seclabel_none:
        _sub(root, "seclabel", type="none")
    if dom.qemu_args:
        commandline = etree.SubElement(root, f"{{{QEMU_NS}}}commandline")
        for arg in dom.qemu_args:
            etree.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=arg)
    return root


def to_xml(dom: Domain) -> str:
    return etree.tostring(to_element(dom), encoding="unicode", pretty_print=True)
