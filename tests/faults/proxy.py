"""TCP proxies the fault tests put between the nodes of a cluster, and between the nodes and their
clients, so a test can cut one node off (a network partition) and heal it again.

They run in a thread of their own, with an event loop of their own: the test's loop blocks while
it starts or restarts nodes, and the routes between nodes must keep flowing meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import defaultdict


class Proxies:
    """Forwards 127.0.0.1 ports to others; `cut` a group's proxies, then `heal` them."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxies", daemon=True)
        self._thread.start()
        self._servers: list[asyncio.AbstractServer] = []
        self._groups: dict[str, list[int]] = defaultdict(list)  # group -> the listen ports in it
        self._cut: set[int] = set()
        self._conns: dict[int, set[asyncio.StreamWriter]] = defaultdict(set)

    def add(self, listen: int, target: int, *groups: str) -> None:
        """Forward ``listen`` to ``target``; the proxy belongs to ``groups`` (cut together)."""
        future = asyncio.run_coroutine_threadsafe(self._serve(listen, target), self._loop)
        self._servers.append(future.result(timeout=10))
        for group in groups:
            self._groups[group].append(listen)

    def cut(self, group: str) -> None:
        """Drop every connection through the group's proxies, and refuse new ones."""
        asyncio.run_coroutine_threadsafe(self._set_cut(group, cut=True), self._loop).result(timeout=10)

    def heal(self, group: str) -> None:
        asyncio.run_coroutine_threadsafe(self._set_cut(group, cut=False), self._loop).result(timeout=10)

    def close(self) -> None:
        async def closing() -> None:
            for server in self._servers:
                server.close()
            for writers in self._conns.values():
                for writer in writers:
                    writer.close()

        asyncio.run_coroutine_threadsafe(closing(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _set_cut(self, group: str, *, cut: bool) -> None:
        for port in self._groups[group]:
            if cut:
                self._cut.add(port)
                for writer in list(self._conns[port]):
                    writer.close()
            else:
                self._cut.discard(port)

    async def _serve(self, listen: int, target: int) -> asyncio.AbstractServer:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if listen in self._cut:
                writer.close()
                return
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
            except OSError:
                writer.close()
                return
            self._conns[listen] |= {writer, up_writer}
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                self._conns[listen] -= {writer, up_writer}
                writer.close()
                up_writer.close()

        return await asyncio.start_server(handle, "127.0.0.1", listen)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()
