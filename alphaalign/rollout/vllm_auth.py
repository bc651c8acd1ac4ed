"""A shared secret on every endpoint of the vLLM servers the project starts.

vLLM's own `--api-key` guards only the paths under /v1, /v2, /inference and /cohere (vllm 0.31,
`entrypoints/serve/middleware/authenticate.py`); dev mode's /collective_rpc (any worker method, weight reloads
from any path), /reset_prefix_cache, /sleep, /server_info, /metrics, /tokenize and the rest stay open. So the
servers run with `RequireToken`, an ASGI middleware given to vLLM as `--middleware`: every request without
`Authorization: Bearer <token>` is refused with 401, on every path except /health (readiness probes; it
says only whether the server is up). The token comes from the environment variable `ALPHAALIGN_VLLM_TOKEN`,
never from a command line or a recipe, so it is not written into logs or recipe copies; a server started
without one refuses to start.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets

TOKEN_ENV = "ALPHAALIGN_VLLM_TOKEN"
MIDDLEWARE = "alphaalign.rollout.vllm_auth.RequireToken"
OPEN_PATHS = frozenset({"/health"})


def new_token() -> str:
    return secrets.token_urlsafe(32)


def env_token() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()  # equal-length inputs for a constant-time compare


class RequireToken:
    """Pure ASGI middleware: HTTP and websocket requests must carry the job's bearer token."""

    def __init__(self, app):
        token = env_token()
        if token is None:
            raise RuntimeError(f"{TOKEN_ENV} is not set: refusing to serve without a secret")
        self.app, self._digest = app, _digest(token)

    def _allowed(self, scope) -> bool:
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path in OPEN_PATHS:
            return True
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(_digest(token), self._digest)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = json.dumps({"error": "Unauthorized"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
            }
        )
        await send({"type": "http.response.body", "body": body})
