"""A network namespace of a test's own, joined to the root namespace by a veth pair, with a link
the test can slow down or cut: real kernel networking between the test and a process it runs
inside the namespace (`ip netns exec`).

    with network_namespace() as ns:        # skips the test when it cannot be made
        process = ns.spawn([python, "-m", ...], env=..., log=path)
        ns.delay(200)                      # the namespace's outgoing packets wait 200 ms
        ns.cut()                           # nothing in or out (a partition: silent loss)
        ns.heal()
    # the processes are stopped by PID, the namespace, the veth pair and the rules are gone

Addresses come from a private /30 in 10.213.0.0/16 that no interface of the machine uses yet
(`ns.host_address` is the root end, `ns.address` the namespace's end). Only the namespace and
the veth pair made here are ever changed.

Impairment: `tc qdisc ... netem` on the veth when the kernel has sch_netem. Kernels built
without it (this project's VMs) get the same effect from netfilter inside the namespace: a
netdev ingress+egress `drop` (nft) on the namespace's veth for a cut (silent, as loss 100%: the
sockets see no error, only silence), and for a delay an nft `queue` of the namespace's
outgoing packets (an xtables NFQUEUE rule) to tests/nfq_delay.py, which lets each go after the delay (one way, as netem
on one interface). The namespace's netfilter tables are its own: the host's are never touched.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import pytest

__all__ = ["NetNamespace", "network_namespace", "unavailable_reason"]

_BASE = ipaddress.ip_network("10.213.0.0/16")
_QUEUE = 7
"""The NFQUEUE number inside the namespace (queues are per namespace)."""
_QUEUE_RULE_ADD = ("iptables-legacy", "-w", "-A", "OUTPUT", "-o")
_QUEUE_RULE_DELETE = ("iptables-legacy", "-w", "-D", "OUTPUT", "-o")
_QUEUE_TARGET = ("-j", "NFQUEUE", "--queue-num", str(_QUEUE))
# Netdev hooks drop at the device, below IP: the sockets get no error (an OUTPUT-chain drop
# would fail their sends with EPERM), as on a link that loses everything.
_CUT_TABLE = """
table netdev streammesh_cut {{
  chain cut_in {{
    type filter hook ingress device "{device}" priority 0; policy drop
  }}
  chain cut_out {{
    type filter hook egress device "{device}" priority 0; policy drop
  }}
}}
"""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=20)


def unavailable_reason() -> str | None:
    """Why namespaces with an impairable link cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns, veth, tc/nft)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"network namespace tests need `{tool}` (iproute2)"
    probe = f"smprobe{secrets.token_hex(3)}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    try:
        if _netem_available(probe):
            return None
        for tool in ("nft", "iptables-legacy"):
            if shutil.which(tool) is None:
                return f"the kernel has no sch_netem and `{tool}` is missing (to impair the link)"
        try:
            import fnfqueue  # noqa: F401
        except ImportError:
            return "the kernel has no sch_netem and fnfqueue is not installed (no link delay)"
        return None
    finally:
        _run("ip", "netns", "del", probe, check=False)


def _netem_available(namespace: str) -> bool:
    """Whether `tc ... netem` works (tried on the probe namespace's loopback)."""
    tried = _run(
        "tc",
        "-n",
        namespace,
        "qdisc",
        "add",
        "dev",
        "lo",
        "root",
        "netem",
        "delay",
        "1ms",
        check=False,
    )
    return tried.returncode == 0


def _free_subnet() -> ipaddress.IPv4Network:
    """A random /30 of 10.213.0.0/16 that no address or route of the machine overlaps."""
    used = [
        ipaddress.ip_interface(word).network
        for line in _run("ip", "-4", "-o", "addr", "show").stdout.splitlines()
        for word in line.split()
        if "/" in word and word[0].isdigit()
    ]
    for line in _run("ip", "-4", "route", "show").stdout.splitlines():
        with contextlib.suppress(ValueError):
            used.append(ipaddress.ip_network(line.split()[0], strict=False))
    for _ in range(100):
        start = _BASE.network_address + 4 * secrets.randbelow(_BASE.num_addresses // 4)
        subnet = ipaddress.IPv4Network(f"{start}/30")
        if not any(subnet.overlaps(other) for other in used):
            return subnet
    raise RuntimeError("no free /30 in 10.213.0.0/16")


class NetNamespace:
    """One namespace, its veth pair and the processes started in it (see the module doc)."""

    def __init__(self) -> None:
        tag = secrets.token_hex(4)
        self.name = f"streammesh-test-{tag}"
        self.host_device = f"smv{tag}h"
        """The root namespace's end of the veth pair."""
        self.device = f"smv{tag}n"
        """The namespace's end of the veth pair."""
        subnet = _free_subnet()
        self.host_address = str(subnet.network_address + 1)
        self.address = str(subnet.network_address + 2)
        self.netem = False
        self._processes: list[subprocess.Popen[bytes]] = []
        self._delayer: subprocess.Popen[bytes] | None = None
        self._logs: list[IO[bytes]] = []

    def create(self) -> None:
        """The namespace with loopback up and the veth pair addressed on both ends."""
        _run("ip", "netns", "add", self.name)
        _run("ip", "link", "add", self.host_device, "type", "veth", "peer", "name", self.device,
             "netns", self.name)  # fmt: skip
        _run("ip", "addr", "add", f"{self.host_address}/30", "dev", self.host_device)
        _run("ip", "link", "set", self.host_device, "up")
        _run("ip", "-n", self.name, "addr", "add", f"{self.address}/30", "dev", self.device)
        _run("ip", "-n", self.name, "link", "set", self.device, "up")
        _run("ip", "-n", self.name, "link", "set", "lo", "up")
        self.netem = _netem_available(self.name)
        if self.netem:
            _run("tc", "-n", self.name, "qdisc", "del", "dev", "lo", "root")

    def spawn(
        self, argv: Sequence[str], *, env: Mapping[str, str], log: Path
    ) -> subprocess.Popen[bytes]:
        """Run `argv` inside the namespace (its output to `log`); stopped by `remove()`.
        `ip netns exec` execs the command, so the PID is the command's own."""
        out = log.open("ab")
        self._logs.append(out)
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *argv],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._processes.append(process)
        return process

    def delay(self, milliseconds: int) -> None:
        """Every packet the namespace sends waits `milliseconds` (replaces any impairment)."""
        self.heal()
        if self.netem:
            self._tc("replace", "dev", self.device, "root", "netem", "delay", f"{milliseconds}ms")
            return
        self._delayer = subprocess.Popen(
            ["ip", "netns", "exec", self.name, sys.executable, "-m", "tests.nfq_delay",
             str(_QUEUE), str(milliseconds)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent,
        )  # fmt: skip
        assert self._delayer.stdout is not None
        ready = self._delayer.stdout.readline()
        if ready.strip() != b"ready":
            self._stop(self._delayer)
            raise RuntimeError(f"tests.nfq_delay did not start: {ready!r}")
        # nft's own `queue` needs CONFIG_NFT_QUEUE, which such kernels often lack too; the
        # xtables NFQUEUE target (the namespace's own legacy table) does the same.
        self._in_namespace(*_QUEUE_RULE_ADD, self.device, *_QUEUE_TARGET)

    def cut(self) -> None:
        """Nothing goes in or out of the namespace's link, silently (replaces any impairment)."""
        self.heal()
        if self.netem:
            self._tc("replace", "dev", self.device, "root", "netem", "loss", "100%")
            _run("tc", "qdisc", "replace", "dev", self.host_device, "root", "netem", "loss", "100%")
            return
        self._nft(_CUT_TABLE.format(device=self.device))

    def heal(self) -> None:
        """The link as made: no delay, no loss."""
        if self.netem:
            _run("tc", "-n", self.name, "qdisc", "del", "dev", self.device, "root", check=False)
            _run("tc", "qdisc", "del", "dev", self.host_device, "root", check=False)
            return
        self._in_namespace("nft", "delete", "table", "netdev", "streammesh_cut", check=False)
        while (
            self._in_namespace(
                *_QUEUE_RULE_DELETE, self.device, *_QUEUE_TARGET, check=False
            ).returncode
            == 0
        ):
            pass  # until no such rule is left
        if self._delayer is not None:
            self._stop(self._delayer)  # it lets what it holds go first
            self._delayer = None

    def stop_processes(self) -> None:
        """Stop every process started in the namespace (by PID: SIGTERM, SIGKILL after 10 s)."""
        for process in [*self._processes, *([self._delayer] if self._delayer else [])]:
            self._stop(process)
        self._processes.clear()
        self._delayer = None
        for log in self._logs:
            log.close()
        self._logs.clear()

    def remove(self) -> None:
        """Stop every process started here, then remove the namespace and the veth pair."""
        self.stop_processes()
        _run("ip", "netns", "del", self.name, check=False)
        if _run("ip", "link", "show", self.host_device, check=False).returncode == 0:
            _run("ip", "link", "del", self.host_device, check=False)

    @staticmethod
    def _stop(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if process.stdout is not None:
            process.stdout.close()

    def _in_namespace(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", self.name, *argv, check=check)

    def _tc(self, *argv: str) -> None:
        _run("tc", "-n", self.name, "qdisc", *argv)

    def _nft(self, ruleset: str) -> None:
        subprocess.run(
            ["ip", "netns", "exec", self.name, "nft", "-f", "-"],
            input=ruleset,
            text=True,
            capture_output=True,
            check=True,
            timeout=20,
        )


@contextlib.contextmanager
def network_namespace() -> Iterator[NetNamespace]:
    """A new namespace (the test is skipped, saying why, when none can be made); everything in
    it is removed afterwards, also when the test fails."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    namespace = NetNamespace()
    try:
        namespace.create()
        yield namespace
    finally:
        namespace.remove()
