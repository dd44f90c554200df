"""Running the app under uvicorn: the listening socket, the address line, and a graceful stop.

The socket is bound here, before uvicorn starts, so ``--port 0`` works (the line ``mm serve: listening on URL``
names the port the system chose) and a port in use fails at once with a message. SIGTERM / SIGINT stop
accepting, let in-flight requests finish (at most ``grace`` seconds), stop the batchers, and exit 0.
"""
from __future__ import annotations

import ipaddress
import signal
import socket
import sys
from typing import Any


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (IPv4 or IPv6); OSError names the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto says TCP, and with Nagle
    # on, every answer on a kept-alive connection waits ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(app: Any, sock: socket.socket, *, grace: float, max_connections: int, log_level: str = "warning",
        access_log: bool = False) -> int:
    """Serve ``app`` on ``sock`` until SIGTERM / SIGINT; 0 after a graceful stop."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=grace, limit_concurrency=max_connections,
                            timeout_keep_alive=5, server_header=False)
    server = uvicorn.Server(config)
    # uvicorn takes SIGTERM / SIGINT while it runs and raises the signal again when done, with the handler it
    # found; this one makes that last raise end the process with 0, as every graceful stop of mm's commands does.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    print(f"mm serve: listening on {url_of(sock)} (page: /, API docs: /docs)", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    print("mm serve: stopped", file=sys.stderr, flush=True)
    return 0
