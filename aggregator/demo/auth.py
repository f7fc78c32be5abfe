"""The demo's OAuth2 token server, a protected service, and POST/GraphQL-style endpoints.

- `POST /oauth/token`: the client-credentials grant for client `demo-client` with secret
  `demo-secret` (HTTP Basic or in the form); `?ttl=S` sets the lifetime of the token it issues
  (default 60 s), `?delay=S` answers late, `?status=N` answers HTTP N instead.
- `GET|POST /protected/{rest}`: answers `{"ok": true, ...}` for a bearer token this server
  issued that has not expired nor been rotated away, else 401; `?delay=S` answers late.
- `POST /_oauth/rotate`: every token issued so far stops working (a key rotation);
  `GET /_oauth`: the token requests and protected calls counted, the last grant's form (secret
  left out) and the tokens issued (so tests can prove none leaks); `POST /_oauth/reset` zeroes
  all that and forgets the tokens.
- `POST /post/echo`: the JSON body received, parsed and raw, so tests see its structure.
- `POST /graphql`: a tiny GraphQL-ish service (no library): `{"data": {"echo": {"query",
  "variables"}}}`; a query naming `failing` answers `errors` and no data, one naming `partial`
  both.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from aggregator.demo.behaviours import json_response

CLIENT_ID = "demo-client"
CLIENT_SECRET = "demo-secret"


@dataclass
class AuthState:
    """Tokens issued (token -> monotonic expiry) and what was asked of this server."""

    tokens: dict[str, float] = field(default_factory=dict)
    token_requests: int = 0
    protected_calls: int = 0
    rejected: int = 0
    last_grant: dict[str, str] = field(default_factory=dict)


AUTH_KEY = web.AppKey("auth", AuthState)


def _seconds(request: web.Request, knob: str, default: float) -> float:
    try:
        return max(0.0, min(float(request.query.get(knob, default)), 3600.0))
    except ValueError:
        return default


def _client(request: web.Request, form: dict[str, str]) -> tuple[str, str]:
    header = request.headers.get("Authorization", "")
    if header.startswith("Basic "):
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return "", ""
        return unquote(user), unquote(password)
    return form.get("client_id", ""), form.get("client_secret", "")


async def _token(request: web.Request) -> web.Response:
    """The client-credentials grant (RFC 6749 4.4)."""
    state = request.app[AUTH_KEY]
    state.token_requests += 1
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    state.last_grant = {k: v for k, v in form.items() if k != "client_secret"}
    delay = _seconds(request, "delay", 0.0)
    if delay:
        await asyncio.sleep(delay)
    if "status" in request.query:
        return json_response(int(request.query["status"]), {"error": "forced by knob"})
    if form.get("grant_type") != "client_credentials":
        return json_response(400, {"error": "unsupported_grant_type"})
    if _client(request, form) != (CLIENT_ID, CLIENT_SECRET):
        return json_response(401, {"error": "invalid_client"})
    ttl = _seconds(request, "ttl", 60.0)
    token = secrets.token_urlsafe(24)
    state.tokens[token] = time.monotonic() + ttl
    return json_response(200, {"access_token": token, "token_type": "Bearer", "expires_in": ttl})


async def _protected(request: web.Request) -> web.Response:
    """A service that wants a valid bearer token."""
    state = request.app[AUTH_KEY]
    state.protected_calls += 1
    header = request.headers.get("Authorization", "")
    token = header[7:] if header.startswith("Bearer ") else ""
    expiry = state.tokens.get(token)
    if expiry is None or time.monotonic() >= expiry:
        state.rejected += 1
        return web.json_response(
            {"error": "invalid_token"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    delay = _seconds(request, "delay", 0.0)
    if delay:
        await asyncio.sleep(delay)
    return json_response(200, {"ok": True, "path": request.match_info["rest"]})


async def _rotate(request: web.Request) -> web.Response:
    request.app[AUTH_KEY].tokens.clear()
    return json_response(200, {"status": "rotated"})


async def _counts(request: web.Request) -> web.Response:
    state = request.app[AUTH_KEY]
    return json_response(
        200,
        {
            "token_requests": state.token_requests,
            "protected_calls": state.protected_calls,
            "rejected": state.rejected,
            "last_grant": state.last_grant,
            "issued": list(state.tokens),
        },
    )


async def _reset(request: web.Request) -> web.Response:
    state = request.app[AUTH_KEY]
    state.token_requests = state.protected_calls = state.rejected = 0
    state.last_grant = {}
    state.tokens.clear()
    return json_response(200, {"status": "reset"})


async def _post_echo(request: web.Request) -> web.Response:
    raw = await request.text()
    try:
        parsed: Any = json.loads(raw)
    except ValueError:
        parsed = None
    return json_response(
        200,
        {"content_type": request.content_type, "json": parsed, "raw": raw},
    )


async def _graphql(request: web.Request) -> web.Response:
    try:
        asked = json.loads(await request.text())
    except ValueError:
        return json_response(400, {"errors": [{"message": "not JSON"}]})
    query = asked.get("query") if isinstance(asked, dict) else None
    if not isinstance(query, str):
        return json_response(400, {"errors": [{"message": "no query"}]})
    variables = asked.get("variables") or {}
    if "failing" in query:
        return json_response(200, {"errors": [{"message": "secret internals"}], "data": None})
    echo = {"query": query, "variables": variables}
    if "partial" in query:
        return json_response(
            200, {"data": {"echo": echo, "extra": None}, "errors": [{"message": "extra"}]}
        )
    return json_response(200, {"data": {"echo": echo}})


def add_auth_routes(app: web.Application) -> None:
    """Register these endpoints (before the demo's catch-all)."""
    app[AUTH_KEY] = AuthState()
    app.router.add_routes(
        [
            web.post("/oauth/token", _token),
            web.route("*", "/protected/{rest:.*}", _protected),
            web.post("/_oauth/rotate", _rotate),
            web.post("/_oauth/reset", _reset),
            web.get("/_oauth", _counts),
            web.post("/post/echo", _post_echo),
            web.post("/graphql", _graphql),
        ]
    )
