"""Local TCP ports: a free one to serve on, and why a given one cannot be bound.

One place for what the launcher, the load runner and the bench scripts each need before they start
a server or a Locust web UI on this machine.
"""

from __future__ import annotations

import socket

from kvlab.errors import KvlabError


def _family(host_: str) -> int:
    return socket.AF_INET6 if ":" in host_ else socket.AF_INET


def _cannot_listen(host_: str, e: OSError) -> KvlabError:
    return KvlabError(f"--host {host_!r}: cannot listen there ({e.strerror or e}); the default is 127.0.0.1")


def free_port(host_: str = "127.0.0.1") -> int:
    """A port the OS says is free on `host_` now (another process may take it before it is bound)."""
    with socket.socket(_family(host_), socket.SOCK_STREAM) as s:
        try:
            s.bind((host_, 0))
        except OSError as e:  # an unknown name, an address of another machine
            raise _cannot_listen(host_, e) from None
        return s.getsockname()[1]


def port_in_use(host_: str, port: int) -> str | None:
    """Why (host, port) cannot be bound, or None. SO_REUSEADDR as servers set it (TIME_WAIT is fine)."""
    with socket.socket(_family(host_), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host_, port))
        except socket.gaierror as e:
            raise _cannot_listen(host_, e) from None
        except OSError as e:
            return e.strerror or str(e)
    return None
