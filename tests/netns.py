"""Linux network namespaces for tests: a "host" of its own (a namespace joined to this machine
by a veth pair) that reaches this machine's loopback-only services through forwarders, and
whose link can be cut and restored.

    with namespace("w1") as ns:                     # needs root and iproute2; see unavailable()
        pg = ns.expose(5432)                        # 127.0.0.1:5432 as seen from inside the namespace
        url = f"postgresql+psycopg://postgres@{pg.address}/db"
        proc = ns.popen([sys.executable, "-c", ...], env=...)   # a process living in the namespace
        ns.cut()                                    # the veth goes down: packets are silently lost
        ns.restore()                                # ... and flow again (TCP retransmits what was lost)
        pg.hold(); pg.release()                     # one service alone stops answering (and resumes)
        pg.reset()                                  # its connections are dropped with a RST, no FIN

PostgreSQL, Redis and the like listen on 127.0.0.1 only, which a namespace cannot reach. A
`Forward` listens on the host end of the veth (the namespace's gateway address) and relays
each connection to the service on 127.0.0.1: a small TCP proxy in this process, so that no
firewall rule or sysctl of the machine is touched. Every namespace gets its own /30 out of
10.213.0.0/16 and a name with this process's pid, so concurrent test runs do not collide.

A partition comes in three shapes:
    cut / restore     the link itself goes down (host side): everything the namespace sends or
                      receives is dropped without a word; connections survive a short cut
    hold / release    one forwarded service goes silent (bytes are neither read nor passed on,
                      new connections are not answered) while the others keep working
    reset             one forwarded service's open connections are torn down with a RST
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator, Sequence
from typing import Any

SUBNET_PREFIX = "10.213"
_counter = itertools.count()
_lock = threading.Lock()


def unavailable() -> str | None:
    """Why namespaces cannot be made here (not root, no `ip`), or None when they can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    probe = f"mmprobe{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"`ip netns add` failed: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


def _used_subnets() -> set[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    return {word.rsplit(".", 1)[0] for word in out.split() if word.startswith(SUBNET_PREFIX + ".")}


def _pick_subnet() -> tuple[str, str]:
    """(host address, namespace address) of a /30 no interface of this machine uses yet."""
    used = _used_subnets()
    start = (os.getpid() * 7 + next(_counter)) % (256 * 64)
    for i in range(256 * 64):
        n = (start + i) % (256 * 64)
        third, fourth = divmod(n * 4, 256)
        net = f"{SUBNET_PREFIX}.{third}"
        if f"{net}.{fourth}" in used or f"{net}.{fourth + 1}" in used or f"{net}.{fourth + 2}" in used:
            continue
        return f"{net}.{fourth + 1}", f"{net}.{fourth + 2}"
    raise RuntimeError(f"no free /30 left in {SUBNET_PREFIX}.0.0/16")


class Forward:
    """A TCP relay from (listen_host, port) to (target_host, target_port), with a tap to make the
    service go silent (hold), come back (release) or drop every connection (reset)."""

    def __init__(self, listen_host: str, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server((listen_host, 0), backlog=128)
        self.host, self.port = self._listener.getsockname()[:2]
        self._open = threading.Event()
        self._open.set()
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self.connections = 0  # accepted since the start
        self._thread = threading.Thread(target=self._accept_loop, name=f"forward-{self.port}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """host:port to connect to from inside the namespace."""
        return f"{self.host}:{self.port}"

    def hold(self) -> None:
        """The service goes silent: nothing is relayed either way and new connections wait
        unanswered (no RST, no FIN), as behind a partition."""
        self._open.clear()

    def release(self) -> None:
        """Relay again; what was held back is delivered."""
        self._open.set()

    @property
    def held(self) -> bool:
        return not self._open.is_set()

    def reset(self) -> int:
        """Tear down every open connection with a RST (SO_LINGER 0: no FIN). Returns how many
        sockets (both ends of each connection) were reset."""
        with self._conns_lock:
            conns = list(self._conns)
            self._conns.clear()
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.close()
        return len(conns)

    def close(self) -> None:
        self._closed.set()
        self._open.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        self.reset()

    # -- the relay --------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._open.wait()  # held: the connection sits unanswered until released
            if self._closed.is_set():
                client.close()
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the service itself is down: refuse, as it would
                continue
            self.connections += 1
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._conns_lock:
                self._conns.update((client, upstream))
            pair = _Pair(client, upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(pair, src, dst), daemon=True).start()

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                self._open.wait()
                data = src.recv(65536)
                if not data:
                    break
                self._open.wait()  # held while this was in flight: it is delivered on release
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)  # pass the FIN on (a no-op once reset)
        if pair.done():  # both directions ended: the connection is over
            with self._conns_lock:
                self._conns.difference_update((src, dst))
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.close()


class _Pair:
    """A relayed connection's two sockets; over once both directions ended."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.sockets = (client, upstream)
        self._left = 2
        self._lock = threading.Lock()

    def done(self) -> bool:
        with self._lock:
            self._left -= 1
            return self._left == 0


class Namespace:
    """One network namespace joined to this machine by a veth pair: `host_ip` is this
    machine's end (where `expose` listens), `ns_ip` the namespace's."""

    def __init__(self, label: str) -> None:
        self.name = f"mm{os.getpid()}{label}"[:32]
        n = next(_counter)
        self.host_if, self.ns_if = f"mmh{os.getpid() % 100000}x{n}"[:15], f"mmn{os.getpid() % 100000}x{n}"[:15]
        self.host_ip, self.ns_ip = "", ""
        self.forwards: list[Forward] = []
        self.cuts = 0
        self.is_cut = False

    def create(self) -> Namespace:
        with _lock:
            self.host_ip, self.ns_ip = _pick_subnet()
            _ip("netns", "add", self.name)
            try:
                _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
                _ip("link", "set", self.ns_if, "netns", self.name)
                _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
                _ip("link", "set", self.host_if, "up")
                _ip("addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if, netns=self.name)
                _ip("link", "set", self.ns_if, "up", netns=self.name)
                _ip("link", "set", "lo", "up", netns=self.name)
            except BaseException:
                self.delete()
                raise
        return self

    # -- processes inside ---------------------------------------------------------------------
    def command(self, args: Sequence[str]) -> list[str]:
        """args wrapped to run inside the namespace (`ip netns exec` execs them: same pid)."""
        return ["ip", "netns", "exec", self.name, *args]

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.command(args), **kwargs)

    def run(self, args: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(self.command(args), **kwargs)

    # -- services of this machine ---------------------------------------------------------------
    def expose(self, port: int, target_host: str = "127.0.0.1") -> Forward:
        """Make target_host:port of this machine reachable from inside at the returned
        Forward's address (host_ip and a port of its own)."""
        fwd = Forward(self.host_ip, port, target_host)
        self.forwards.append(fwd)
        return fwd

    # -- the link -------------------------------------------------------------------------------
    def cut(self) -> None:
        """The link goes down (this machine's end): from now on every packet either way is lost,
        silently. Open connections are not told; they stall and retransmit."""
        _ip("link", "set", self.host_if, "down")
        self.cuts += 1
        self.is_cut = True

    def restore(self) -> None:
        _ip("link", "set", self.host_if, "up")
        self.is_cut = False
        # the route to the /30 returns with the link; the address stays assigned throughout

    def delete(self) -> None:
        for fwd in self.forwards:
            fwd.close()
        self.forwards.clear()
        subprocess.run(["ip", "link", "delete", self.host_if], capture_output=True)  # takes its peer along
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)


@contextlib.contextmanager
def namespace(label: str) -> Iterator[Namespace]:
    """A namespace for the block: created (root needed), deleted on exit with its forwards.
    Processes started inside should be stopped first (a deleted namespace does not kill them)."""
    ns = Namespace(label).create()
    try:
        yield ns
    finally:
        ns.delete()
