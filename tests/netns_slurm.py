"""A private Slurm of several nodes on one machine, each node in its own network namespace.

Mechanism (network namespaces, not Slurm's multiple-slurmd mode): node *i* is a network namespace
``nrl<PID>-node<i>`` joined by a veth pair to a bridge ``nrl<PID>br`` in the root namespace. The
bridge holds slurmctld's address (``.1``), node *i* has ``.i+1`` of a private /24 that no route
of the machine uses. Each node's slurmd starts through
``nsenter --net=/run/netns/NS unshare --mount --uts -- sh -c 'mount ...; hostname node<i>; exec slurmd
-N node<i>'``,
so it, its slurmstepd and every job process on it have the node's own address, its own hostname
(``socket.gethostname()`` is ``node<i>`` in a rank), a private ``/dev/shm`` (a tmpfs of its
own, as on separate machines) and a private ``/etc/hosts``: a file in the state dir,
bind-mounted over ``/etc/hosts`` in the node's private mount namespace, listing every node. So MASTER_ADDR, the first node's Slurm name,
resolves on every node as it would through a cluster's DNS, and nothing under ``/etc`` is
touched. The file systems (the run dir, the data, ``/tmp``) are shared, as a cluster's
parallel file system would be; ``/tmp`` being shared is the one difference from real nodes.

A node dies with ``kill_node``: its link goes down first (so no FIN or RST leaves it, as when a
machine loses power), then every process in its namespace gets SIGKILL. ``revive_node`` brings
the link up and starts a new slurmd. munged and slurmctld run in the root namespace; munge's
socket is a file, reachable from every namespace.

Cleanup: ``stop()`` (idempotent; also registered with atexit) kills what runs in each namespace
by PID, deletes the namespaces (which deletes the veth pairs) and the bridge, and stops the
daemons; the bind mounts live only in the nodes' mount namespaces and go with their processes.
Resources of a session that was killed before cleaning up are found by the PID in their names
and removed at the next start, never those of a live process.

``python tests/netns_slurm.py DIR [NODES]`` starts one and waits (Ctrl-C stops it).
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from slurm_fixture import LocalSlurm, _memory_mb, _which, serve

PREFIX = "nrl"  # every namespace, link and bridge this module creates starts with it


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def missing_capabilities() -> str | None:
    """Why this machine cannot host the cluster (None: it can): namespaces, veth and bridges."""
    if os.geteuid() != 0:
        return "not running as root"
    for program in ("ip", "unshare", "mount"):
        if subprocess.run(["which", program], capture_output=True).returncode != 0:
            return f"{program} is not installed (apt-get install iproute2 util-linux mount)"
    probe = f"{PREFIX}{os.getpid()}probe"
    try:
        _ip("netns", "add", probe)
        _ip("link", "add", f"{PREFIX}{os.getpid()}p", "type", "bridge")
    except RuntimeError as e:
        return f"network namespaces or bridges are not available: {e}"
    finally:
        _ip("link", "del", f"{PREFIX}{os.getpid()}p", check=False)
        _ip("netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def reap_stale() -> None:
    """Remove namespaces and bridges a killed session of this fixture left behind (their names carry
    the PID of the process that made them; only those whose process is gone are touched)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.match(rf"^{PREFIX}(\d+)-node\d+$", name)
        if m and not _alive(int(m.group(1))):
            _kill_namespace(name)
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        m = re.search(rf"\d+: ({PREFIX}(\d+)br)[:@]", line)
        if m and not _alive(int(m.group(2))):
            _ip("link", "del", m.group(1), check=False)


def _namespace_pids(netns: str) -> list[int]:
    out = _ip("netns", "pids", netns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_namespace(netns: str, timeout_s: float = 20) -> None:
    """SIGKILL every process in a network namespace until none is left."""
    deadline = time.monotonic() + timeout_s
    while pids := _namespace_pids(netns):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in {netns} survived SIGKILL")
        time.sleep(0.05)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 that overlaps no address or route of the machine, picked by PID."""
    used = [ipaddress.ip_network(w, strict=False) for w in
            re.findall(r"(\d+\.\d+\.\d+\.\d+(?:/\d+)?)", _ip("-4", "route", "show", "table", "all").stdout
                       + _ip("-4", "addr").stdout)]
    for i in range(256):
        n = (os.getpid() + i * 7919) % 60000
        net = ipaddress.ip_network(f"10.{200 + n // 250 % 50}.{n % 250}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.x.y.0/24 for the private cluster")


class NetnsSlurm(LocalSlurm):
    """``nodes`` Slurm nodes ``node1`` … ``nodeN``, each in a network namespace of its own."""

    def __init__(self, state_dir: str | Path, nodes: int = 2, slurmd_timeout_s: int = 300):
        super().__init__(state_dir)
        self.slurmd_timeout_s = slurmd_timeout_s
        self.tag = f"{PREFIX}{os.getpid()}"
        self.bridge = f"{self.tag}br"
        self.subnet = _free_subnet()
        hosts = list(self.subnet.hosts())
        self.ctld_addr = str(hosts[0])
        self.nodes = [f"node{i + 1}" for i in range(nodes)]
        self.addr = {n: str(hosts[i + 1]) for i, n in enumerate(self.nodes)}
        self.netns = {n: f"{self.tag}-{n}" for n in self.nodes}
        self.veth = {n: f"{self.tag}h{i + 1}" for i, n in enumerate(self.nodes)}  # the root side; ≤ 15 chars
        self.hosts_file = self.state / "hosts"
        self._made: list[tuple[str, str]] = []  # ("netns"|"link", name), for cleanup
        atexit.register(self.stop)

    def node_lines(self) -> str:
        cpus, memory = os.cpu_count() or 2, _memory_mb() // len(self.nodes)
        return "\n".join(f"NodeName={n} NodeHostname={n} NodeAddr={self.addr[n]} CPUs={cpus} RealMemory={memory} "
                         "State=UNKNOWN" for n in self.nodes)

    def start(self, timeout_s: float = 60) -> NetnsSlurm:
        reap_stale()
        why = missing_capabilities()
        if why:
            raise RuntimeError(f"this machine cannot host a multi-node private Slurm: {why}")
        self.state.mkdir(parents=True, exist_ok=True)
        try:
            self._network()
        except BaseException:
            self.stop()
            raise
        super().start(timeout_s)
        return self

    def _network(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        _ip("addr", "add", f"{self.ctld_addr}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        lines = ["127.0.0.1 localhost", f"{self.ctld_addr} {self.host}"]
        for i, node in enumerate(self.nodes):
            ns, host_end, node_end = self.netns[node], self.veth[node], f"{self.tag}n{i + 1}"
            _ip("netns", "add", ns)
            self._made.append(("netns", ns))
            _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
            _ip("link", "set", node_end, "netns", ns)
            _ip("link", "set", host_end, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[node]}/{self.subnet.prefixlen}", "dev", node_end)
            _ip("-n", ns, "link", "set", node_end, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            lines.append(f"{self.addr[node]} {node}")
        self.hosts_file.write_text("\n".join(lines) + "\n")

    def start_nodes(self) -> None:
        for node in self.nodes:
            self.start_slurmd(node)

    def start_slurmd(self, node: str) -> None:
        # The node's network, then a private mount namespace (slave to the root's, so the shared
        # file systems stay visible) with its /etc/hosts and its own /dev/shm, and its hostname;
        # then slurmd in its place. Not `ip netns exec`: it remounts /sys, hiding the cgroup
        # file system that slurmd 22.05 insists on even with proctrack/linuxproc.
        script = (f"mount --bind {self.hosts_file} /etc/hosts && mount -t tmpfs -o mode=1777 tmpfs /dev/shm && "
                  f"hostname {node} && exec {_which('slurmd')} -D -N {node} -f {self.conf}")
        self._spawn(f"slurmd-{node}", ["nsenter", f"--net=/run/netns/{self.netns[node]}", "--",
                                       "unshare", "--mount", "--uts", "--propagation", "slave", "--",
                                       "sh", "-c", script])

    def in_node(self, node: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command on ``node`` (its network, hostname and mounts: those of its slurmd)."""
        slurmd = self.procs.get(f"slurmd-{node}")
        if slurmd is None or slurmd.poll() is not None:
            raise RuntimeError(f"{node} has no running slurmd")
        proc = subprocess.run(["nsenter", "-t", str(slurmd.pid), "-n", "-u", "-m", "--", *cmd],
                              capture_output=True, text=True, env=self.env(), timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"on {node}: {' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def popen_in_node(self, node: str, cmd: list[str], hosts: Path, env: dict) -> subprocess.Popen:
        """Start ``cmd`` on ``node`` (its network and hostname) with ``hosts`` as its /etc/hosts, in a
        mount namespace of its own (how a node with another name resolution looks to a rank)."""
        slurmd = self.procs[f"slurmd-{node}"]
        script = f"mount --bind {hosts} /etc/hosts && exec \"$@\""
        return subprocess.Popen(["nsenter", "-t", str(slurmd.pid), "-n", "-u", "--", "unshare", "--mount",
                                 "--propagation", "slave", "--", "sh", "-c", script, "sh", *cmd],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def node_pids(self, node: str) -> list[int]:
        """Every process running on ``node`` (its slurmd included)."""
        return _namespace_pids(self.netns[node])

    def kill_node(self, node: str) -> None:
        """The node dies: its link goes down (nothing leaves it any more, not even a TCP reset),
        then its slurmd, slurmstepd and every job process on it get SIGKILL."""
        _ip("link", "set", self.veth[node], "down")
        _kill_namespace(self.netns[node])
        proc = self.procs.pop(f"slurmd-{node}", None)
        if proc is not None:
            proc.wait(timeout=15)

    def revive_node(self, node: str) -> None:
        """The node comes back: link up, a new slurmd (ReturnToService=2 returns it to service)."""
        _ip("link", "set", self.veth[node], "up")
        self.start_slurmd(node)

    def stop(self) -> None:
        """Jobs, the nodes' processes, the namespaces, the bridge, then the daemons (idempotent)."""
        try:
            self.cancel_all(timeout_s=20)
        except (OSError, subprocess.SubprocessError):
            pass  # the namespaces below are emptied by SIGKILL either way
        for kind, name in reversed(self._made):
            if kind == "netns":
                _kill_namespace(name)
                _ip("netns", "del", name, check=False)
            else:
                _ip("link", "del", name, check=False)
        self._made.clear()
        for proc in [p for n, p in self.procs.items() if n.startswith("slurmd-")]:
            proc.wait(timeout=15)  # killed with its namespace
        self.procs = {n: p for n, p in self.procs.items() if not n.startswith("slurmd-")}
        self.stop_daemons()  # (not cancel_all again: with the nodes gone, squeue answered after 18 s)


if __name__ == "__main__":
    nodes = NetnsSlurm(sys.argv[1], nodes=int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    serve(nodes, f"nodes {nodes.addr}")
