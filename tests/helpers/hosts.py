"""Several "hosts" on one machine: a network namespace each, joined by a veth pair.

Each namespace has its own interfaces, addresses and ports, so processes started in one
reach the other only across the veth link, by address, as two machines on a LAN would.
Creating namespaces needs root (CAP_SYS_ADMIN) and iproute2; without them the hosts fall
back to this machine's loopback (as does NANOGPT_TEST_HOSTS=loopback), which still runs one
launcher per "host" but crosses no link.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

SUBNET = "10.231.0"  # private, and inside the namespaces only: nothing on the machine sees it


@dataclass(frozen=True)
class Host:
    name: str
    address: str  # where the other hosts reach this one
    interface: str  # the interface that address lives on (for GLOO_SOCKET_IFNAME)
    netns: str | None  # None: this machine's own network namespace

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run on this host; `ip netns exec` execs in place, so the pid is argv's own."""
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else list(argv)


@dataclass(frozen=True)
class SimulatedHosts:
    hosts: tuple[Host, ...]
    isolated: bool  # True: real namespaces and a veth link; False: the loopback fallback
    note: str  # one line saying which, for the test output


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _delete_namespace(name: str) -> None:
    # Deleting a namespace also deletes the veth end inside it, and with it the peer end.
    subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)


def _create_pair(prefix: str) -> tuple[Host, Host]:
    a, b = f"{prefix}-a", f"{prefix}-b"
    tag = prefix.rsplit("-", 1)[-1]
    veth_a, veth_b = f"ng{tag}a", f"ng{tag}b"  # interface names are limited to 15 characters
    for name in (a, b):
        _delete_namespace(name)  # left over from a run that was killed before it cleaned up
        _ip("netns", "add", name)
    _ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
    hosts = []
    for index, (name, veth) in enumerate(((a, veth_a), (b, veth_b)), start=1):
        address = f"{SUBNET}.{index}"
        _ip("link", "set", veth, "netns", name)
        _ip("-n", name, "addr", "add", f"{address}/24", "dev", veth)
        # Loopback-sized frames: at Ethernet's 1500 bytes the kernel's per-packet work on two
        # shared cores, not the training, would set the pace of every all-reduce.
        _ip("-n", name, "link", "set", veth, "mtu", "65535", "up")
        _ip("-n", name, "link", "set", "lo", "up")
        hosts.append(Host(name=f"node{index - 1}", address=address, interface=veth, netns=name))
    return hosts[0], hosts[1]


@contextlib.contextmanager
def two_hosts() -> Iterator[SimulatedHosts]:
    """Two hosts in network namespaces joined by a veth pair, deleted again however the test ends."""
    prefix = f"nanogpt-test-{os.getpid()}"
    names = (f"{prefix}-a", f"{prefix}-b")
    reason = None
    if os.environ.get("NANOGPT_TEST_HOSTS") == "loopback":
        reason = "NANOGPT_TEST_HOSTS=loopback asks for it"
    elif shutil.which("ip") is None:
        reason = "iproute2's `ip` is not installed"
    elif os.geteuid() != 0:
        reason = "creating network namespaces needs root"
    pair = None
    if reason is None:
        try:
            pair = _create_pair(prefix)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            reason = f"`ip netns` failed: {detail.strip()}"
    try:
        if pair is not None:
            yield SimulatedHosts(pair, True, f"two hosts in network namespaces {names[0]} ({pair[0].address}) and "
                                             f"{names[1]} ({pair[1].address}), joined by a veth pair")
        else:
            # Two addresses of the loopback network, so that each host still has its own.
            loopback = tuple(Host(name=f"node{i}", address=f"127.0.0.{i + 1}", interface="lo", netns=None)
                             for i in (0, 1))
            yield SimulatedHosts(loopback, False, f"FALLBACK: {reason}, so both agents run on this machine's "
                                                  "loopback with distinct ports instead of on two hosts")
    finally:
        for name in names:
            if pair is not None:
                _delete_namespace(name)
