"""Published ports (docker's `-p`) for VMs on a libvirt NAT network, with nftables.

herdsman owns one table, `ip herdsman` (ruleset.py says what is in it), rebuilt whole from the
bindings of every running VM each time one changes, and gone when no VM publishes anything.
Outside it, two things the kernel and libvirt 9.0 make necessary, each undone with the table:
route_localnet on the guests' bridge for 127.0.0.1 (localnet.py) and one ACCEPT rule in
FORWARD ahead of libvirt's reject for clients on other hosts (forward.py).

    model.py      PortRequest, PortBinding (kept in the VM's metadata), PublishedVm, PortRange
    allocate.py   host ports for one VM, conflict checks (pure)
    host.py       the host's addresses, listening sockets, bridge networks (/proc/net, psutil)
    ruleset.py    every VM's bindings → the table's nft script (pure)
    nft.py        `nft -f` and `nft -j list`
    localnet.py   route_localnet
    forward.py    the FORWARD accept rule
    publisher.py  PortPublisher: allocate, sync, clear — what the driver calls

Nothing here imports the agent or libvirt.
"""
