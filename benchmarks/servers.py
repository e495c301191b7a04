"""Loopback servers for the benchmarks, each run as ``python -m benchmarks.servers``:

* ``moto``: moto's S3 API (ThreadedMotoServer) on 127.0.0.1, a free port;
* ``proxy HOST:PORT DELAY``: a TCP proxy on 127.0.0.1 that forwards to HOST:PORT
  and holds every chunk DELAY seconds in each direction, keeping order, so each
  request/response exchange gets ``2 * DELAY`` of round trip and no bandwidth cap.

Each prints ``host:port`` on its first line once it listens, then serves until
it is terminated.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading


def run_moto() -> None:
    import logging

    from moto.server import ThreadedMotoServer

    # A log line per request costs the server more than the request.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    print(f"{host}:{port}", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    stopped.wait()
    server.stop()


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
) -> None:
    loop = asyncio.get_running_loop()
    held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def release() -> None:
        while True:
            due, data = await held.get()
            if not data:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    releaser = asyncio.create_task(release())
    try:
        while True:
            data = await reader.read(65536)
            await held.put((loop.time() + delay, data))
            if not data:
                break
    except ConnectionError:
        await held.put((0.0, b""))
    with contextlib.suppress(ConnectionError):
        await releaser


async def _serve_proxy(target: str, delay: float) -> None:
    host, port = target.rsplit(":", 1)

    async def handle(
        client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(
                host, int(port)
            )
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            _pump(client_reader, server_writer, delay),
            _pump(server_reader, client_writer, delay),
            return_exceptions=True,
        )

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    address = server.sockets[0].getsockname()
    print(f"{address[0]}:{address[1]}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str]) -> None:
    if argv[:1] == ["moto"]:
        run_moto()
    elif argv[:1] == ["proxy"] and len(argv) == 3:
        asyncio.run(_serve_proxy(argv[1], float(argv[2])))
    else:
        sys.exit("usage: python -m benchmarks.servers moto | proxy HOST:PORT DELAY")


if __name__ == "__main__":
    main(sys.argv[1:])
