"""Start-up problems an operator can fix (a busy port, an unreadable file): one
exception type whose message says what is wrong and what to do, in one line, and
the checks that raise it before grpc or the model get a chance to fail noisily."""

from __future__ import annotations

import errno
import socket
from pathlib import Path


class StartupError(Exception):
    """A start-up problem the operator can fix; the message says what and how, in
    one line."""


def read_file(path: str) -> bytes:
    """The bytes of a file named on the command line (TLS certificate or key)."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read {path} ({exc.strerror or exc})") from None


def bind_problem(what: str, host: str, port: int, exc: OSError) -> str:
    """Why host:port could not be bound, and which flag fixes it."""
    flag = "--metrics-port" if what == "metrics" else "--port"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} is in use on {host} ({what}); stop the other server or pick "
            f"another {flag}"
        )
    if exc.errno == errno.EACCES:
        return f"port {port} on {host} ({what}) needs privileges; pick a {flag} above 1023"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine ({what}); check --host"
    return f"cannot listen on {host}:{port} for {what} ({exc.strerror or exc})"


def probe_port(what: str, host: str, port: int) -> None:
    """Raise StartupError when host:port cannot be bound (busy, privileged, no such
    address). SO_REUSEADDR as grpc sets it: a listener conflicts, TIME_WAIT does not."""
    try:
        infos = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(f"cannot resolve --host {host} ({exc.strerror})") from None
    for family, kind, proto, _name, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise StartupError(bind_problem(what, host, port, exc)) from None
