"""An emulated network for benchmarks: a TCP proxy that delays each direction.

``tc netem`` is not available on these machines, so benchmarks that need a
network between the application and its databases route every connection
through this proxy instead: each chunk read from one side is delivered to
the other side ``delay`` seconds after it arrived (a timestamp per chunk,
not a sleep per chunk, so chunks in flight overlap and throughput is not
throttled), in order, in both directions. A round trip through it costs
``2 * delay`` more than on loopback, plus the proxy's own hop (tens of
microseconds; :func:`self_check` measures both).

One event loop, in a background thread, serves every listener and
connection. It uses ``select()``: epoll's timeouts have millisecond
resolution, which would round a 0.25 ms delay up to 1 ms (``select()`` is
limited to file descriptors under 1024, plenty for a benchmark). The TCP
handshake is not delayed: connections are opened before anything is timed.

The proxy also counts **round trips** per client connection: the times the
client spoke after the server had answered (a request and everything sent
with it before the answer count once, so statements sent together in one
pipeline count once)::

    with Network(delay=0.00025) as net:
        port = net.proxy("127.0.0.1", 5432)   # connect here instead
        ...
        net.round_trips([client_port])         # client_port: the socket's local port

    with delayed_port("127.0.0.1", 5432, 0.00025) as port: ...   # just the port

Run it to check it on this machine (prints the measured added round trip):

    python benchmarks/netproxy.py [--delay-ms 0.25]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import selectors
import socket
import statistics
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType


def _precise_timers() -> None:
    """Linux wakes a sleeping thread up to 50 us late by default (timer
    slack, to batch wake-ups): 10 % of a 0.5 ms round trip. Ask for 1 ns
    for this thread (``prctl(PR_SET_TIMERSLACK)``); elsewhere, do nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


class _Pipe(asyncio.Protocol):
    """One side of a proxied connection: what it receives goes, delayed, to
    its peer side; what the peer receives is written here."""

    def __init__(self, net: Network, stats: _Connection, *, client_side: bool) -> None:
        self._net = net
        self.stats = stats
        self._client_side = client_side
        #: Client side: the server to relay to.
        self.upstream: tuple[str, int] = ("", 0)
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        #: Chunks received here, with when they are due on the peer side; an
        #: empty chunk stands for the end of the stream.
        self._due: collections.deque[tuple[float, bytes]] = collections.deque()
        self._ended = False  # the end of the stream was received (EOF or lost)
        self._lost = False  # this side's connection is gone
        self.finished = False  # the end of the stream was passed on to the peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._client_side:
            self._net._accepted(self)
        elif self.peer is not None:  # deliver what the client sent meanwhile
            self.peer._deliver()

    def data_received(self, data: bytes) -> None:
        self.stats.saw(client=self._client_side)
        self._schedule(data)

    def eof_received(self) -> bool:
        self._schedule(b"")
        return True  # half-close: the other direction may still carry data

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._schedule(b"")

    def pause_writing(self) -> None:  # the kernel buffer is full: stop the source
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def _schedule(self, data: bytes) -> None:
        if self._ended:
            return
        self._ended = not data
        loop = self._net.loop
        due = loop.time() + self._net.delay
        self._due.append((due, data))
        # The loop's timer heap may run callbacks due at the same time in any
        # order: each callback delivers every chunk due, from the head.
        loop.call_at(due, self._deliver)

    def _deliver(self) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            return  # the upstream connection is not open yet: it delivers then
        now = self._net.loop.time()
        while self._due and self._due[0][0] <= now:
            _, data = self._due.popleft()
            if data:
                peer.transport.write(data)
                continue
            self.finished = True
            if self._lost or peer.finished or not peer.transport.can_write_eof():
                peer.transport.close()
                if self.transport is not None:
                    self.transport.close()
            else:
                peer.transport.write_eof()


class _Connection:
    """Round trips seen on one proxied connection."""

    def __init__(self) -> None:
        self.round_trips = 0
        self._server_spoke = True

    def saw(self, *, client: bool) -> None:
        if client and self._server_spoke:
            self.round_trips += 1
        self._server_spoke = not client


class Network:
    """Delaying TCP proxies on 127.0.0.1, one event loop thread for all.

    :param delay: one-way delay in seconds, applied in each direction.
    """

    def __init__(self, delay: float) -> None:
        if delay < 0:
            raise ValueError(f"delay must be >= 0, not {delay!r}")
        self.delay = delay
        self.loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._servers: list[asyncio.Server] = []
        self._lock = threading.Lock()
        #: Per client port (the client socket's local port).
        self._connections: dict[int, _Connection] = {}

    def _run(self) -> None:
        _precise_timers()
        self.loop.run_forever()

    def __enter__(self) -> Network:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        async def close() -> None:
            for server in self._servers:
                server.close()
                await server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def proxy(self, host: str, port: int) -> int:
        """Listen on a free 127.0.0.1 port; relay each connection there to
        ``host:port``, delayed. Returns the port to connect to."""

        def accept() -> _Pipe:
            stats = _Connection()
            client = _Pipe(self, stats, client_side=True)
            client.peer = _Pipe(self, stats, client_side=False)
            client.peer.peer = client
            client.upstream = (host, port)
            return client

        async def listen() -> asyncio.Server:
            return await self.loop.create_server(accept, "127.0.0.1", 0)

        server = asyncio.run_coroutine_threadsafe(listen(), self.loop).result(10)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    def _accepted(self, client: _Pipe) -> None:
        """``client`` is connected: count its round trips, connect upstream."""
        assert client.transport is not None
        assert client.peer is not None
        upstream = client.peer
        with self._lock:
            self._connections[client.transport.get_extra_info("peername")[1]] = client.stats

        async def connect() -> None:
            try:
                await self.loop.create_connection(lambda: upstream, *client.upstream)
            except OSError:
                assert client.transport is not None
                client.transport.close()

        self.loop.create_task(connect())

    def round_trips(self, client_ports: Iterable[int]) -> int:
        """Round trips so far on the connections from these client ports."""
        with self._lock:
            found = [self._connections.get(port) for port in client_ports]
        return sum(c.round_trips for c in found if c is not None)


@contextmanager
def delayed_port(host: str, port: int, delay: float) -> Iterator[int]:
    """A proxy to ``host:port`` delaying each direction by ``delay`` seconds;
    yields the port to connect to instead."""
    with Network(delay) as net:
        yield net.proxy(host, port)


# -- self-check ----------------------------------------------------------------


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    """An echo server on a free port, a thread per connection."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # the listener was closed
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return listener, thread


def _ping_pong_ms(port: int, count: int) -> float:
    """Median milliseconds of a 1-byte request answered by the echo server."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        took = []
        for _ in range(count):
            started = time.perf_counter()
            conn.sendall(b"x")
            conn.recv(1)
            took.append(time.perf_counter() - started)
    return statistics.median(took) * 1000


def self_check(delay: float, *, count: int = 200) -> dict[str, float]:
    """Check the proxy against an echo server; raise AssertionError when wrong.

    - order and content: a 4 MiB payload, written at once and in many small
      writes, comes back byte for byte;
    - the delay: a ping-pong through the proxy takes at least ``2 * delay``
      more than without it (a floor: the machine's load can only add to
      it; 5 % spared for the clocks), reported with the hop of the proxy
      itself. Not ``2 * delay`` more than through a proxy without delay: the
      delayed proxy's own work runs within the delay it waits out, so that
      difference falls short of ``2 * delay`` by up to the hop;
    - no throttling: 200 chunks sent back to back arrive in about one
      delay, not 200 (under 50 delays allows for a loaded machine);
    - round trips: 10 ping-pongs count 10.

    :returns: milliseconds: ``direct``, ``hop`` (added by the proxy alone),
        ``added`` (by the delay), ``burst`` (200 chunks, one way and back).
    """
    listener, _ = _echo_server()
    echo = listener.getsockname()[1]
    try:
        with Network(0.0) as plain, Network(delay) as slow:
            plain_port = plain.proxy("127.0.0.1", echo)
            slow_port = slow.proxy("127.0.0.1", echo)
            direct = _ping_pong_ms(echo, count)
            hop = _ping_pong_ms(plain_port, count) - direct
            added = _ping_pong_ms(slow_port, count) - direct - hop
            if delay:  # without one, only noise is left to compare
                assert added + hop >= 2 * delay * 1000 * 0.95, (added, hop, delay)

            payload = bytes(range(256)) * 16384  # 4 MiB
            with socket.create_connection(("127.0.0.1", slow_port)) as conn:
                client = conn.getsockname()[1]
                conn.sendall(payload[:1_000_000])
                for i in range(1_000_000, len(payload), 1000):
                    conn.sendall(payload[i : i + 1000])
                received = bytearray()
                while len(received) < len(payload):
                    received += conn.recv(1 << 20)
                assert bytes(received) == payload, "bytes reordered or lost"

                started = time.perf_counter()
                for _ in range(200):
                    conn.sendall(b"y" * 100)
                received = bytearray()
                while len(received) < 20_000:
                    received += conn.recv(65536)
                burst = (time.perf_counter() - started) * 1000
                assert burst < 50 * 2 * delay * 1000 + 5, f"throttled: {burst:.1f} ms"
                conn.shutdown(socket.SHUT_WR)
                assert conn.recv(1) == b"", "the end of the stream was not passed on"
            with socket.create_connection(("127.0.0.1", slow_port)) as conn:
                client = conn.getsockname()[1]
                for _ in range(10):
                    conn.sendall(b"z")
                    conn.recv(1)
                assert slow.round_trips([client]) == 10, slow.round_trips([client])
    finally:
        listener.close()
    return {"direct": direct, "hop": hop, "added": added, "burst": burst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=0.25, help="one-way delay")
    args = parser.parse_args()
    r = self_check(args.delay_ms / 1000)
    print(
        f"ping-pong: direct {r['direct']:.3f} ms, proxy hop {r['hop']:+.3f} ms, "
        f"delay {r['added']:+.3f} ms (expected {2 * args.delay_ms:.3f}); "
        f"200 chunks there and back {r['burst']:.2f} ms"
    )


if __name__ == "__main__":
    main()
