"""What the HTTP front ends (`mixtral serve`, `mixtral ui`) check of a request a web browser may have sent for a
page of another site.

- The Host header must name this server (`host_allowed`): an IP address, `localhost`, or a name it was given
  (`--allowed-hosts`; "*" accepts any). The defence against DNS rebinding, where a page points its own domain
  name at 127.0.0.1 and then talks to the local server as its own origin; the attack needs a name.
- For the web app (`WebAppGuard`), a request that can change something (POST, PUT, PATCH, DELETE) must come from
  the page itself: a browser's `Origin` must be the address the request went to, or name one of the allowed
  hosts (behind a reverse proxy the page's origin is the proxy's: list its name with --allowed-hosts), and
  `Sec-Fetch-Site` must not say cross-site. A page elsewhere could otherwise send the app a form, an upload or a
  text/plain POST without asking first (a CORS "simple request"). Clients that are not browsers send neither
  header and pass.
"""

from __future__ import annotations

import ipaddress
import json
from urllib.parse import urlsplit

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def host_name(host: str) -> str:
    """The name in a Host header value: name, name:port, IPv4:port, [IPv6]:port or a bare IPv6 address."""
    if host.startswith("["):
        name = host[1:host.find("]")] if "]" in host else host
    else:
        name = host.split(":")[0] if host.count(":") == 1 else host
    return name.rstrip(".").lower()


def normalize_hosts(names) -> frozenset[str]:
    return frozenset(h.strip().rstrip(".").lower() for h in names)


def host_allowed(host: str, allowed: frozenset[str]) -> bool:
    """Whether a Host header value names this server (see the module docstring); `allowed` from normalize_hosts."""
    if not host or "*" in allowed:
        return True
    name = host_name(host)
    return name == "localhost" or name in allowed or is_ip(name)


def origin_allowed(origin: str, host: str, scheme: str, allowed: frozenset[str]) -> bool:
    """Whether an Origin header names the address a request was sent to (its Host header and scheme), or a host
    this server was told is its own (`allowed`, from normalize_hosts: a reverse proxy's name)."""
    parts = urlsplit(origin)
    if parts.scheme == scheme and parts.netloc.lower() == host.lower():
        return True
    return parts.scheme in ("http", "https") and bool(parts.hostname) and (
        "*" in allowed or host_name(parts.netloc) in allowed)


def _header(scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


class WebAppGuard:
    """ASGI middleware for the web app: 421 for a Host that is not this server's, 403 for a request that can
    change something and comes from another site's page (module docstring). Errors are JSON {"error": ...}."""

    def __init__(self, app, allowed_hosts=()):
        self.app, self.allowed = app, normalize_hosts(allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        host = _header(scope, b"host")
        if not host_allowed(host, self.allowed):
            return await self._refuse(scope, send, 421, f"Host {host!r} is not a name of this server (start it "
                                                         "with --allowed-hosts to add one)")
        method = scope.get("method", "GET")  # a websocket handshake is a GET that a page elsewhere may open
        if method not in SAFE_METHODS or scope["type"] == "websocket":
            origin, site = _header(scope, b"origin"), _header(scope, b"sec-fetch-site")
            scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"), scope.get("scheme", "http"))
            if (origin and not origin_allowed(origin, host, scheme, self.allowed)) or site == "cross-site":
                return await self._refuse(scope, send, 403, f"a {method} from another site's page ({origin or site})"
                                                            " is refused; open the app's own page")
        return await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope, send, status: int, message: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
            return
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
