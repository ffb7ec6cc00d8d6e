"""Hugging Face hub access that fails fast: the offline flags and a 2 s reachability probe.

The hub clients retry for about half a minute before they give up on a network that is not
there; `unavailable()` answers at once (an offline flag) or within 2 s (a TCP probe, DNS
included), so callers can fail with a message naming the offline alternative instead.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 2.0
HUB_OFFLINE = "HF_HUB_OFFLINE"  # every hub client
DATASETS_OFFLINE = "HF_DATASETS_OFFLINE"  # `datasets` only


def endpoint() -> str:
    """The hub's URL: HF_ENDPOINT when set (a mirror), else huggingface.co."""
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT)


def offline(*, datasets: bool = False) -> str | None:
    """The offline flag that is set ("HF_HUB_OFFLINE", or with datasets=True also
    "HF_DATASETS_OFFLINE"), or None when the hub may be used."""
    names = (HUB_OFFLINE, DATASETS_OFFLINE) if datasets else (HUB_OFFLINE,)
    for name in names:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return name
    return None


def reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to the hub opens within `timeout_s` (DNS included)."""
    url = urllib.parse.urlparse(endpoint())
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    ok = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)  # a thread bounds a slow DNS lookup too
    t.start()
    t.join(timeout_s)
    return bool(ok)


def unavailable(*, datasets: bool = False) -> str | None:
    """Why the hub cannot be used now ("HF_HUB_OFFLINE is set", "it is not reachable at
    URL"), or None when it can; completes within PROBE_TIMEOUT_S."""
    flag = offline(datasets=datasets)
    if flag is not None:
        return f"{flag} is set"
    if not reachable():
        return f"it is not reachable at {endpoint()}"
    return None
