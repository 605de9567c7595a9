"""What one connection may cost a worker: uvicorn's httptools protocol with the limits it lacks.

uvicorn (with httptools, the fastest of the servers measured in docs/http-server.md) arms no timer
before a request's answer: a connection that sends half a request line, or trickles the body its
Content-Length promised, stays open for ever; a connection that never sends a byte too; and httptools
accumulates a header of any size, at a cost that grows with it, on the worker's one event loop. Its
`limit_concurrency` answers 503 to every request past the bound, `/health` included. So each
connection here has, by its phase:

- idle (opened, or its previous answer sent): closed quietly after `keep_alive_s` without a byte;
- head (its first byte came): the request line and headers within `header_timeout_s`, else 408, and
  within `max_header_bytes`, else 431; past the cap nothing more of it is parsed;
- body: the whole body within `body_timeout_s` of the head, else 408 (or the connection closed when
  the answer has started, e.g. a 413 while its body is drained);
- answer: the request's own `request_timeout_s` (http/app.py) bounds the work; a client that stops
  reading its answer is cut off after `send_timeout_s` with the answer unsent.

Past `max_connections` open in this worker, idle connections are closed, oldest first, to make room;
when none is idle the new connection is served only for the routes that cost nothing (`/health`,
`/info`, `/metrics`): the others answer 503 Overloaded with Retry-After, and it is closed after one
answer. A load balancer's probe therefore always gets through.

Refusals made here, before the app has the request, are written in API.md's error shape by
responses.raw_error_response (the one place that maps an error kind to its status)."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from collections.abc import Callable
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..config import Settings
from ..errors import ApiError, HeaderTooLarge, SlowClient
from .responses import raw_error_response

#: the scope key the app reads (envelope.py): this connection came past `max_connections`
OVER_CAPACITY = "nerserve.over_capacity"


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    """The settings this module enforces (config.Settings holds their defaults and meanings)."""

    keep_alive_s: float
    header_timeout_s: float
    body_timeout_s: float
    send_timeout_s: float
    max_header_bytes: int
    max_connections: int

    @classmethod
    def of(cls, settings: Settings) -> ConnectionLimits:
        return cls(**{field.name: getattr(settings, field.name) for field in dataclasses.fields(cls)})


class Phase(enum.Enum):
    IDLE = "idle"
    HEAD = "head"
    BODY = "body"
    ANSWER = "answer"


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's protocol with the limits of the module docstring (ConnectionLimits' defaults; a server
    gets its own through `guarded_protocol`)."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits.of(Settings())

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase = Phase.IDLE
        self.head_bytes = 0  # of the head being read
        self.heads = 0  # heads read whole on this connection
        self.over_capacity = False
        self.idle_since = self.phase_began = 0.0
        self.deadline: asyncio.TimerHandle | None = None
        self.send_deadline: asyncio.TimerHandle | None = None

    # --- the connection's life
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._shed_idle_connections()
            self.over_capacity = len(self.connections) > self.limits.max_connections
        self._await_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.send_deadline is not None:
            self.send_deadline.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.IDLE:
            self.phase, self.phase_began = Phase.HEAD, self.loop.time()
            self._disarm()
        if self.phase is not Phase.BODY:  # a head (or, while answering, the next pipelined one)
            room = self.limits.max_header_bytes - self.head_bytes
            if len(data) > room:  # parse up to the cap: past it, the head must have ended
                heads = self.heads
                super().data_received(data[:room])
                if self.heads == heads:
                    if not self.transport.is_closing():
                        limit = self.limits.max_header_bytes
                        self._refuse(HeaderTooLarge(f"the request line and headers exceed {limit} bytes"))
                    return
                data = data[room:]
            else:
                self.head_bytes += len(data)
        super().data_received(data)
        # A deadline only for a phase that this data left unfinished: most requests come whole in one
        # read, and need no timer of their own.
        if self.deadline is None and not self.transport.is_closing():
            if self.phase is Phase.HEAD:
                self._arm(self.phase_began + self.limits.header_timeout_s, self._head_expired)
            elif self.phase is Phase.BODY:
                self._arm(self.phase_began + self.limits.body_timeout_s, self._body_expired)

    # --- httptools' callbacks, each moving the phase on
    def on_headers_complete(self) -> None:
        self.phase, self.phase_began = Phase.BODY, self.loop.time()
        self.heads += 1
        self._disarm()
        if self.over_capacity:
            self.scope[OVER_CAPACITY] = True  # type: ignore[literal-required]
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.phase, self.head_bytes = Phase.ANSWER, 0
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._unset_keepalive_if_required()  # uvicorn's own idle timer: this module arms its own
        if self.over_capacity:
            self.transport.close()
        elif not self.transport.is_closing() and self.phase is Phase.ANSWER and not self.pipeline:
            if self.head_bytes:  # the next request's head began while this one was answered
                self.phase, self.phase_began = Phase.HEAD, self.loop.time()
                self._arm(self.phase_began + self.limits.header_timeout_s, self._head_expired)
            else:
                self._await_request()

    # --- a client that stops reading its answer
    def pause_writing(self) -> None:
        super().pause_writing()
        if self.send_deadline is None:
            self.send_deadline = self.loop.call_later(self.limits.send_timeout_s, self.transport.abort)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.send_deadline is not None:
            self.send_deadline.cancel()
            self.send_deadline = None

    # --- the timers
    def _await_request(self) -> None:
        self.phase = Phase.IDLE
        self.idle_since = self.loop.time()
        # past the cap, a connection that got through has a second at most to ask
        wait = min(self.limits.keep_alive_s, 1.0) if self.over_capacity else self.limits.keep_alive_s
        self._arm(self.idle_since + wait, self.transport.close)

    def _arm(self, when: float, callback: Callable[[], object]) -> None:
        self._disarm()
        self.deadline = self.loop.call_at(when, callback)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _head_expired(self) -> None:
        self._refuse(
            SlowClient(f"the request line and headers did not arrive within {self.limits.header_timeout_s:g} s")
        )

    def _body_expired(self) -> None:
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()  # the answer has begun (a refusal draining the body): no second one
        else:
            self._refuse(SlowClient(f"the request body did not arrive within {self.limits.body_timeout_s:g} s"))

    def _refuse(self, error: ApiError) -> None:
        """Answer here, before (or instead of) the app, and close: the rest of the request is not read."""
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app sees its client gone; its answer goes nowhere
            self.cycle.message_event.set()
        self.logger.info("refused a connection: %s", error.message)
        self.transport.write(raw_error_response(error))
        self.transport.close()

    def _shed_idle_connections(self) -> None:
        """Close idle connections, oldest first, until this one fits under max_connections."""
        idle = sorted(
            (
                c
                for c in self.connections
                if isinstance(c, GuardedHttpToolsProtocol) and c.phase is Phase.IDLE and c is not self
            ),
            key=lambda c: c.idle_since,
        )
        excess = len(self.connections) - self.limits.max_connections
        for connection in idle[:excess]:
            connection.connections.discard(connection)
            connection.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedHttpToolsProtocol]:
    """The protocol class uvicorn instantiates per connection, carrying this server's limits."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})
