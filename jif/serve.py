"""What keeps one Gradio page usable by many visitors: short errors, caches, slots, the address.

`app.py` builds the page; this module holds the parts that do not depend on it: a visitor's
mistake as a one-line gr.Error (`user_error`), a thread-safe LRU cache (`LRU`), at most a few
generations per visitor (`Slots`, `visitor`) and the check that a host and port can be
served before anything starts (`address_problem`).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import socket
import sys
import threading
from collections import OrderedDict

import gradio as gr


def user_error(message: str) -> gr.Error:
    """A visitor's mistake: the message on the page, one line in the terminal, no traceback."""
    print(f"[app] refused: {message.splitlines()[0]}", file=sys.stderr, flush=True)
    return gr.Error(message, print_exception=False)


class LRU:
    """A small thread-safe least-recently-used cache: get_or_make(key, make)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict = {}

    def get_or_make(self, key, make):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # two visitors asking for the same model load it once
            with self._lock:
                if key in self._items:
                    return self._items[key]
            try:
                value = make()
            finally:
                with self._lock:
                    self._key_locks.pop(key, None)
            with self._lock:
                self._items[key] = value
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
            return value

    def __len__(self) -> int:
        return len(self._items)


class Slots:
    """Generations running per visitor: `hold(visitor)` refuses more than `limit` at once."""

    def __init__(self, limit: int):
        self.limit = limit
        self._running: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, visitor: str):
        with self._lock:
            if self._running[visitor] >= self.limit:
                raise user_error(
                    f"{self.limit} of your generations are still running: wait for one to "
                    "finish, then press Generate again."
                )
            self._running[visitor] += 1
        try:
            yield
        finally:
            with self._lock:
                self._running[visitor] -= 1
                if not self._running[visitor]:
                    del self._running[visitor]


def visitor(request) -> str:
    """Who asks: the client address (a new browser tab is the same visitor), else the session."""
    host = getattr(getattr(request, "client", None), "host", None)
    return str(host or getattr(request, "session_hash", None) or "local")


def address_problem(host: str, port: int) -> str | None:
    """Why the page cannot be served on host:port, naming --host or --port; None if it can."""
    if not 1 <= port <= 65535:
        return f"--port {port} is not a TCP port: use one from 1 to 65535 (default 7860)."
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as e:
        return (
            f"--host {host!r} is not a host name or address here ({e}); use 127.0.0.1 (this "
            "machine only) or 0.0.0.0 (every interface)."
        )
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own socket
        try:
            s.bind(address)
        except OSError as e:
            return {
                errno.EADDRINUSE: f"port {port} on {host} is already in use (another server?); "
                f"pass a free one with --port, e.g. --port {port + 1 if port < 65535 else 7860}.",
                errno.EACCES: f"not allowed to serve on port {port} (ports below 1024 need root); "
                "pass --port 1024 or higher.",
                errno.EADDRNOTAVAIL: f"--host {host!r} is not an address of this machine; "
                "use 127.0.0.1 or 0.0.0.0.",
            }.get(e.errno, f"cannot serve on {host}:{port} ({e}); pass another --host or --port.")
    return None
