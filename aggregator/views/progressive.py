"""An aggregate's answer as it is made: Server-Sent Events or NDJSON (`aggregator.events`).

The view starts the answer through the cache, exactly as for JSON (the same lookup, single-flight
fill, deadline, required sources, guards, stored entry), with a listener that puts each source's
result on a queue as it lands, and returns at once a streaming response whose generator takes
them off the queue: each `source` event is sent when its source has answered, and `done` when
the answer is ready, built from the very `Answer` the JSON request would have had. What landed
is told once; the answer's sources not told live (a hit, another worker's fill, a call cut off
by the deadline) come at the end from its envelope, before `done`. So a hit, or a stale answer,
streams every event at once, and requests coalesced behind one fill hear its sources live.

The generator waits for the queue on the server loop: on the loop itself in loop mode (Flask
runs in a request greenlet: `app.ensure_sync` switches to the loop, which awaits for it), from
a thread in the other modes (`run_coroutine_threadsafe`). Where no server loop outlives the
handler (Flask's test client, a WSGI server) the view waits for the answer and sends every event
at the end. The response is a 200 whatever the answer's status (it is in `done`), never cached
(`Cache-Control: no-store`), and tells proxies not to buffer it (`X-Accel-Buffering: no`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from typing import Any

from flask import Flask, Response, current_app

from aggregator import events
from aggregator.cache import Caller, Lookup
from aggregator.cache.headers import Answer
from aggregator.engine import current_engine
from aggregator.errors import InvalidRequestError, error_body
from aggregator.models import SourceResult
from aggregator.params import ParamValue

logger = logging.getLogger(__name__)

#: What the listener puts on the queue: a result as it lands, or None once the answer is ready.
_Item = tuple[str, SourceResult] | None
_Landed = Callable[[], Coroutine[Any, Any, list[_Item]]]


async def answer(
    name: str, params: Mapping[str, ParamValue], caller: Caller, lookup: Lookup | None
) -> Response:
    """Aggregate `name` as events of the kind `caller.stream` names ("sse", "ndjson")."""
    engine = current_engine()
    kind = caller.stream
    view = name in engine.fill.views
    caller = caller._replace(if_none_match=None)  # events, never a 304
    if lookup is not None:
        lookup = dataclasses.replace(lookup, caller=caller)
    if not engine.cache.live():
        # No server loop outlives this handler: wait for the answer, send it all at the end.
        found = await engine.cache.answer(name, params, caller, lookup)
        return _response(kind, [_ending(kind, found, view, told=set())])
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[_Item] = asyncio.Queue()

    def heard(key: str, result: SourceResult) -> None:
        queue.put_nowait((key, result))

    # Owned by the response: cancelled when it is closed (the client gone) before the end. A
    # cancel stops this request's wait only; a shared fill goes on for the others.
    answering = loop.create_task(engine.cache.answer(name, params, caller, lookup, listener=heard))
    answering.add_done_callback(lambda _: queue.put_nowait(None))
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    response = _response(kind, _live(app, loop, queue, answering, kind, view))

    def stop() -> None:
        with contextlib.suppress(RuntimeError):  # the loop already closed (shutdown)
            loop.call_soon_threadsafe(answering.cancel)

    response.call_on_close(stop)
    return response


def refused(kind: str, exc: InvalidRequestError) -> Response:
    """A bad parameter, as `done` (its status and the one error body) and nothing before it."""
    body = error_body(exc.status, f"{exc.field}: {exc.reason}", field=exc.field)
    return _response(kind, [events.encode(kind, "done", {"status": exc.status, **body})])


def _live(
    app: Flask,
    loop: asyncio.AbstractEventLoop,
    queue: asyncio.Queue[_Item],
    answering: asyncio.Task[Answer],
    kind: str,
    view: bool,
) -> Iterator[bytes]:
    """Each batch of results as it lands, then what the answer adds and `done`."""
    told: set[str] = set()

    async def landed() -> list[_Item]:
        items = [await queue.get()]
        while not queue.empty():
            items.append(queue.get_nowait())
        return items

    ready = False
    while not ready:
        frames = []
        for item in _on_loop(app, loop, landed):
            if item is None:
                ready = True
                continue
            key, result = item
            told.add(key)
            event = events.source_event(key, result, view=view)
            frames.append(events.encode(kind, "source", event))
        if ready:
            try:
                found = answering.result()
            except Exception:
                logger.exception("a progressive answer failed")
                frames.append(_failed(kind))
            else:
                frames.append(_ending(kind, found, view, told))
        yield b"".join(frames)


def _on_loop(app: Flask, loop: asyncio.AbstractEventLoop, coro_fn: _Landed) -> list[_Item]:
    """Await `coro_fn()` on the server loop from the response's generator, wherever it runs."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is None:  # a thread (threads or serial mode): the loop runs it, we wait
        return asyncio.run_coroutine_threadsafe(coro_fn(), loop).result()
    # On the loop's own thread, only a request greenlet may wait: the bridge switches to the loop.
    result: list[_Item] = app.ensure_sync(coro_fn)()
    return result


def _ending(kind: str, found: Answer, view: bool, told: set[str]) -> bytes:
    """The answer's sources not told yet, then `done`."""
    envelope = json.loads(found.body) if found.body else {}
    frames = [
        events.encode(kind, "source", event)
        for event in events.stored_events(envelope, view=view, told=told)
    ]
    done = events.done_event(envelope, found.status, dict(found.headers), view=view)
    frames.append(events.encode(kind, "done", done))
    return b"".join(frames)


def _failed(kind: str) -> bytes:
    body = error_body(500, "the answer failed; see the server's log")
    return events.encode(kind, "done", {"status": 500, **body})


def _response(kind: str, chunks: Iterable[bytes]) -> Response:
    response = Response(chunks, status=200, content_type=events.MEDIA_TYPES[kind])
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Accel-Buffering"] = "no"
    return response
