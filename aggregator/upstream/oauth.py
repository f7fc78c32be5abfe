"""OAuth2 client credentials (RFC 6749 4.4) for sources with `[upstreams.NAME.oauth]`.

One token per worker and credential: `Tokens` hangs off the worker's shared client (one per
loop, `UpstreamClients`), and every source naming the same token URL, client, scopes and
audience shares its `TokenSource`. A token is fetched once for all concurrent callers (one task,
every caller awaits it shielded, so a caller that leaves does not cancel the others' fetch),
used until `LEEWAY` before it expires, and refreshed in the background once three quarters of
its lifetime have passed and a call needs it (an idle worker fetches nothing). A 401 from the
upstream drops that token (if no newer one replaced it already) and the call is retried once
with the next one (`aggregator.upstream.client`).

Authlib's `AsyncOAuth2Client` was the library of choice, and does not fit: it *is* an
`httpx.AsyncClient` (its own pool and transport per credential, beside the worker's shared one
on aiohttp's engine), and what it adds over the grant (refresh on use, under its own lock) is
not the single-flight, early background refresh and 401 handling we need, which we would still
write around it. The grant itself is one form POST; it runs here on the shared client.

Nothing here ever logs or puts into an error the client secret, a token, or the token
endpoint's body (which may echo either); a failure is an `UpstreamAuthError` (kind `auth`) of
the source that needed the token, never of the worker.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

import httpx

from aggregator.errors import UpstreamAuthError

if TYPE_CHECKING:
    from aggregator.config import OAuthConfig

logger = logging.getLogger(__name__)

#: A token is not used in its last seconds (at most a tenth of its lifetime).
LEEWAY = 30.0
#: Share of its lifetime after which a token is refreshed in the background.
REFRESH_AT = 0.75
#: Lifetime assumed when the token endpoint does not say (`expires_in` is only recommended).
DEFAULT_LIFETIME = 60.0
#: The largest token answer read.
MAX_TOKEN_BODY = 64 * 1024

Clock = Callable[[], float]
Credential = tuple[str, str, str, tuple[str, ...], str | None, str]


@dataclass(frozen=True, slots=True)
class Token:
    """One access token and when (monotonic clock) it must be refreshed and stop being used."""

    value: str = ""
    refresh_at: float = 0.0
    usable_until: float = 0.0

    def __repr__(self) -> str:  # never the token itself
        return f"Token(refresh_at={self.refresh_at!r}, usable_until={self.usable_until!r})"


class TokenSource:
    """The token of one credential on one client: cached, single-flight, refreshed early."""

    def __init__(self, oauth: OAuthConfig, *, clock: Clock = time.monotonic) -> None:
        self.oauth = oauth
        self.clock = clock
        self._token: Token | None = None
        self._fetching: asyncio.Task[Token] | None = None
        #: Token requests sent (for tests and the curious; never the tokens).
        self.fetches = 0

    async def token(self, client: httpx.AsyncClient, name: str) -> str:
        """A usable access token, fetched (once for every concurrent caller) when none is."""
        now = self.clock()
        token = self._token
        if token is not None and now < token.usable_until:
            if now >= token.refresh_at and self._fetching is None:
                self._start(client, name)  # early, in the background: callers go on with this one
            return token.value
        task = self._fetching or self._start(client, name)
        return (await asyncio.shield(task)).value

    async def refreshed(self, client: httpx.AsyncClient, name: str, rejected: str) -> str:
        """A token other than `rejected` (the upstream answered 401 to it)."""
        if self._token is not None and self._token.value == rejected:
            self._token = None
        task = self._fetching
        if task is not None and not task.done():
            # A fetch that began before the rejection may still bring the rejected token back
            # (an endpoint that answers the same token until it expires); take the next one.
            token = await asyncio.shield(task)
            if token.value != rejected:
                return token.value
            self._token = None
        return await self.token(client, name)

    def close(self) -> None:
        """Cancel a fetch still out (the client is about to close)."""
        if self._fetching is not None:
            self._fetching.cancel()

    def _start(self, client: httpx.AsyncClient, name: str) -> asyncio.Task[Token]:
        task = asyncio.create_task(self._fetch(client, name), name=f"oauth-token:{name}")
        self._fetching = task
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Token]) -> None:
        if self._fetching is task:
            self._fetching = None
        if not task.cancelled() and task.exception() is None:
            self._token = task.result()

    async def _fetch(self, client: httpx.AsyncClient, name: str) -> Token:
        oauth = self.oauth
        self.fetches += 1
        form = {"grant_type": "client_credentials"}
        if oauth.scopes:
            form["scope"] = " ".join(oauth.scopes)
        if oauth.audience is not None:
            form["audience"] = oauth.audience
        headers = {"Accept": "application/json"}
        if oauth.auth_method == "basic":
            # RFC 6749 2.3.1: both parts form-urlencoded before they are joined.
            pair = f"{quote(oauth.client_id, safe='')}:{quote(oauth.client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form |= {"client_id": oauth.client_id, "client_secret": oauth.client_secret}
        begun = self.clock()
        try:
            async with asyncio.timeout(oauth.timeout):
                async with client.stream(
                    "POST", oauth.token_url, data=form, headers=headers, timeout=oauth.timeout
                ) as resp:
                    if not resp.is_success:
                        raise _failed(name, f"the token endpoint answered HTTP {resp.status_code}")
                    body = bytearray()
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_TOKEN_BODY:
                            raise _failed(name, "the token endpoint's answer is too large")
        except TimeoutError:
            raise _failed(name, f"no token within {oauth.timeout:g} s") from None
        except (httpx.HTTPError, OSError) as exc:
            cause = exc.__cause__ or exc
            raise _failed(
                name, f"cannot reach the token endpoint ({type(cause).__name__})"
            ) from None
        except Exception as exc:  # aiohttp's own errors, unmapped by httpx-aiohttp
            if isinstance(exc, UpstreamAuthError):
                raise
            raise _failed(name, f"cannot reach the token endpoint ({type(exc).__name__})") from None
        token = _parse(name, bytes(body), begun)
        logger.info("oauth token for %s fetched (valid %.0f s)", name, token.usable_until - begun)
        return token


def _parse(name: str, body: bytes, begun: float) -> Token:
    """The token of a token endpoint's JSON answer, or why there is none (never its text)."""
    try:
        answer = json.loads(body)
    except ValueError:
        raise _failed(name, "the token endpoint's answer is not JSON") from None
    if not isinstance(answer, dict):
        raise _failed(name, "the token endpoint's answer is not an object")
    value = answer.get("access_token")
    if not isinstance(value, str) or not value or not value.isascii() or not value.isprintable():
        raise _failed(name, "the token endpoint's answer has no usable access_token")
    kind = answer.get("token_type", "Bearer")
    if not isinstance(kind, str) or kind.lower() != "bearer":
        raise _failed(name, "the token endpoint's token is not a bearer token")
    lifetime = answer.get("expires_in", DEFAULT_LIFETIME)
    if isinstance(lifetime, str) and lifetime.isdigit():
        lifetime = int(lifetime)
    if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
        raise _failed(name, "the token endpoint's expires_in is not a positive number")
    lifetime = float(lifetime)
    return Token(
        value=value,
        refresh_at=begun + lifetime * REFRESH_AT,
        usable_until=begun + lifetime - min(LEEWAY, lifetime / 10),
    )


def _failed(name: str, detail: str) -> UpstreamAuthError:
    logger.warning("oauth token for %s: %s", name, detail)
    return UpstreamAuthError(name, detail)


class Tokens:
    """Every credential's `TokenSource` on one client (one per worker and loop)."""

    def __init__(self) -> None:
        self._sources: dict[Credential, TokenSource] = {}

    def source(self, oauth: OAuthConfig) -> TokenSource:
        key: Credential = (
            oauth.token_url,
            oauth.client_id,
            oauth.client_secret,
            tuple(oauth.scopes),
            oauth.audience,
            oauth.auth_method,
        )
        found = self._sources.get(key)
        if found is None:
            found = self._sources[key] = TokenSource(oauth)
        return found

    def close(self) -> None:
        for source in self._sources.values():
            source.close()


_by_client: weakref.WeakKeyDictionary[httpx.AsyncClient, Tokens] = weakref.WeakKeyDictionary()


def tokens_for(client: httpx.AsyncClient) -> Tokens:
    """The tokens kept for `client` (the worker's shared client keeps them for its life)."""
    found = _by_client.get(client)
    if found is None:
        found = _by_client[client] = Tokens()
    return found


def close_tokens(client: httpx.AsyncClient) -> None:
    """Forget `client`'s tokens and cancel their fetches (before the client closes)."""
    found = _by_client.pop(client, None)
    if found is not None:
        found.close()
