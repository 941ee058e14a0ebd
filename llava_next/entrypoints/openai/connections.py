"""Connection-level defences of the server: the Host allow-list, a header read deadline, a send deadline.

- `allowed_hosts(bind_host, given)`: the Host header values the server answers (DNS rebinding: a web page on
  evil.example whose name is re-pointed at 127.0.0.1 sends `Host: evil.example`, so checking the header
  keeps a browser from driving a loopback server, as Jupyter and ollama do). `given` (--allowed-hosts) wins;
  by default the bound address, plus `localhost`, `127.0.0.1` and `::1` when bound to loopback; a wildcard
  bind (0.0.0.0, ::) or `*` checks nothing. `host_allowed(header, allowed)` compares the name without its port,
  case-insensitively; a request without a Host header (HTTP/1.0; browsers always send one) passes.
- `h11_with_header_timeout(seconds)`: uvicorn's h11 protocol whose connections are closed when a request's
  headers are not complete within `seconds` of the connection opening or of the first byte of a later
  keep-alive request (uvicorn's own timers cover only idle keep-alive connections), so unfinished headers
  cannot hold sockets forever. Bodies have their own deadline (request_body.read_body) and the number of
  connections is bounded by uvicorn's `limit_concurrency` (a 503 beyond it).
- `send_with_deadline(send, seconds)`: an ASGI `send` that raises `SendTimeout` when one message cannot be
  handed to the transport in time (a client that stops reading its stream), so its request can be aborted.

Leaves out: per-IP connection limits and rate limits (a proxy's job), TLS.
"""

from __future__ import annotations

import asyncio
import ipaddress

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str, given: list[str] | None = None) -> frozenset[str] | None:
    """The accepted Host names (lower case, no port), or None for "any"."""
    if given:
        names = frozenset(h.strip().lower().strip("[]") for h in given if h.strip())
        return None if "*" in names else names
    host = bind_host.strip().lower().strip("[]")
    if host in WILDCARDS:
        return None
    return frozenset({host} | (LOOPBACK_NAMES if _is_loopback(host) else set()))


def host_name(header: bytes) -> str:
    """`Host` header -> the name without its port ("[::1]:8000" -> "::1")."""
    text = header.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    if text.count(":") == 1:
        text = text.split(":", 1)[0]
    return text.rstrip(".")


def host_allowed(header: bytes | None, allowed: frozenset[str] | None) -> bool:
    if allowed is None or header is None:
        return True
    return host_name(header) in allowed


def h11_with_header_timeout(seconds: float):
    """A uvicorn H11Protocol subclass closing connections whose request headers take more than `seconds`."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class H11HeaderTimeout(H11Protocol):
        header_timeout = seconds

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            waiting = self.conn.their_state is h11.IDLE  # no complete request line + headers yet
            timer = getattr(self, "_header_timer", None)
            if not waiting and timer is not None:
                timer.cancel()
                self._header_timer = None
            elif waiting and timer is None and not self.transport.is_closing():
                self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

    return H11HeaderTimeout


class SendTimeout(Exception):
    """The client did not take a response message within the send deadline."""


def send_with_deadline(send, seconds: float):
    async def timed(message) -> None:
        try:
            async with asyncio.timeout(seconds):
                await send(message)
        except TimeoutError:
            raise SendTimeout(f"the client did not read for {seconds:g} s") from None

    return timed
