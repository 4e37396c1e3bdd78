"""A byte pipe: the floor any Python relay pays per event on this machine (`run.py --scale`, via `pipe`).

Each accepted connection gets its own connection to the upstream, and bytes
are copied both ways from `data_received` straight into the other
transport's `write`: no HTTP parsing, no task, no ASGI, no copy of our own —
one epoll wake-up, one read and one write per event, on uvloop as the proxy
runs. Not a proxy (it does not even look at the request line); a
measurement instrument, so that the proxy's CPU per event can be read
against what a relay cannot go below in this language, on this kernel.
"""

from __future__ import annotations

import argparse
import asyncio

HOST = "127.0.0.1"  # loopback only, always


class Side(asyncio.Protocol):
    """One end; `peer` is the other end's transport. Flow control both ways, as a relay must."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.early: list[bytes] = []  # client bytes that arrive before the upstream connect completes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.early.append(data)
        else:
            peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:  # our write buffer is full: stop reading the other side
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream-port", type=int, required=True)
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def serve() -> None:
        loop = asyncio.get_running_loop()

        def accepted() -> Side:
            client = Side()

            async def connect() -> None:
                try:
                    _, upstream = await loop.create_connection(Side, HOST, args.upstream_port)
                except OSError:
                    if client.transport is not None:
                        client.transport.close()
                    return
                upstream.peer, client.peer = client, upstream
                for data in client.early:
                    upstream.transport.write(data)
                client.early.clear()

            loop.create_task(connect())
            return client

        server = await loop.create_server(accepted, HOST, args.port, backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
