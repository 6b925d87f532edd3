"""Is the controller reachable with this agent's keys? One authenticated GET of the API base.

Three answers matter and need different fixes: nothing answers (URL, DNS, firewall), it
answers 401/403 (the keys), or it answers (and its Date header shows how far the clocks are
apart).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

from drivers.base import HostCheck


@dataclass(frozen=True)
class ControllerProbe:
    check: HostCheck
    date: str | None = None  # the answer's Date header
    sent: float = 0.0
    received: float = 0.0


def probe(url: str | None, access_key: str, secret_key: str, *, timeout: float = 5.0) -> ControllerProbe:
    if not url:
        return ControllerProbe(HostCheck("warn", "controller", "no CATTLE_URL: only the local debug mode works",
                                         "set CATTLE_URL (and the key pair) for herdsman run"))
    shown = str(httpx.URL(url).copy_with(username=None, password=None))
    sent = time.time()
    try:
        response = httpx.get(url, auth=(access_key, secret_key), timeout=timeout, follow_redirects=False,
                             headers={"User-Agent": "herdsman-check"})
    except httpx.HTTPError as exc:
        return ControllerProbe(HostCheck("fail", "controller", f"{shown} is unreachable: {type(exc).__name__}: {exc}",
                                         "check CATTLE_URL, name resolution and the firewall between this host "
                                         "and the controller"))
    received = time.time()
    date = response.headers.get("date")
    status = response.status_code
    ms = f"{(received - sent) * 1000:.0f} ms"
    if status in (401, 403):
        check = HostCheck("fail", "controller", f"{shown} refused the keys (HTTP {status})",
                          "set CATTLE_ACCESS_KEY and CATTLE_SECRET_KEY to the API key pair the controller "
                          "issued for this host")
    elif 200 <= status < 300:
        check = HostCheck("ok", "controller", f"{shown} accepted the keys (HTTP {status}, {ms})")
    else:
        check = HostCheck("warn", "controller", f"{shown} answered HTTP {status} ({ms})",
                          "CATTLE_URL should be the API base, e.g. http://cattle.example.com:8080/v1")
    return ControllerProbe(check, date, sent, received)
