"""Before Flask: answer a fresh cache hit from the raw ASGI request, or say what was looked up.

A hit never reaches Flask (no WSGI environ, no greenlet, no view); anything else goes on to the
view with the lookup, so the view neither parses the query nor reads the cache again. A request
the fast path cannot judge (bad parameters, credentials the aggregate does not share by) goes to
Flask untouched, which renders the 400 or answers it privately.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from aggregator.cache import Lookup
from aggregator.cache.headers import Answer
from aggregator.errors import InvalidRequestError
from aggregator.params import ParamValue, parse_query

if TYPE_CHECKING:
    from aggregator.cache import AggregateCache
    from aggregator.config import AppConfig


#: Parsed query strings kept (then all dropped at once: bounded, and cheaper than an LRU).
_PARAMS_HELD = 1024


class FastPath:
    """The adapter's look into the cache, per request (path, query string, raw headers)."""

    def __init__(self, cache: AggregateCache, config: AppConfig) -> None:
        self.cache = cache
        self.config = config
        #: (aggregate, query string) -> its parsed parameters: a dashboard asks the same few
        #: queries over and over, and parsing one is a tenth of a hit's CPU in this process.
        self._params: dict[tuple[str, str], dict[str, ParamValue]] = {}

    async def __call__(
        self, path: str, query_string: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> tuple[Answer | None, Lookup | None]:
        started = time.perf_counter()
        name = self.cache.route(path)
        if name is None:
            return None, None
        caller = self.cache.caller(name, headers)
        if not self.cache.shares(name, caller):
            return None, None  # the view answers it privately
        known = self._params.get((name, query_string))
        if known is not None:
            params = dict(known)  # a copy: the view may do what it likes with its own
        else:
            try:
                params = self.config.aggregates[name].parse_params(parse_query(query_string))
            except InvalidRequestError:
                return None, None  # Flask renders the 400
            if len(self._params) >= _PARAMS_HELD:
                self._params.clear()
            self._params[(name, query_string)] = dict(params)
        lookup = await self.cache.lookup(name, params, started=started, caller=caller)
        answer = self.cache.hit(lookup)
        return (answer, None) if answer is not None else (None, lookup)
