"""Requests the server cannot take, answered with the reason instead of a 500.

* A body over `max_upload_mb` gets 413 before the server reads it whole: a declared `Content-Length`
  over the bound is refused before a byte of the body is read; a body sent without one (chunked) is
  counted as it arrives and refused once it passes the bound. Nothing is stored either way.
* A full disk (or quota) met by any request gets 507 with the reason.

The guard sits inside MONAI Label's error handler, so its answers reach the client as they are.
"""

from __future__ import annotations

import errno
import json
import logging

from fastapi import FastAPI

logger = logging.getLogger(__name__)


class _TooLarge(Exception):
    pass


class UploadLimit:
    """ASGI wrapper that refuses request bodies over `max_bytes` with 413, and answers 507 on a full disk.

    Args:
        app: the ASGI app it wraps.
        max_bytes: the largest body accepted.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send, scope, f"{int(declared)} bytes declared")
        seen, over, replied = 0, False, False

        async def counted():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes and not replied:  # once the app has answered, let it read on
                    over = True
                    raise _TooLarge  # stops the parser; FastAPI may turn it into its own 400
            return message

        async def reply(message):  # once over the bound, the app's own answer is replaced by the 413
            nonlocal replied
            if not over:
                replied = replied or message["type"] == "http.response.start"
                return await send(message)
            if not replied and message["type"] == "http.response.start":
                replied = True
                await self._refuse(send, scope, f"more than {self.max_bytes} bytes sent")

        try:
            await self.app(scope, counted, reply)
        except _TooLarge:
            pass
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or replied:
                raise
            logger.error("%s %s: %s", scope.get("method"), scope.get("path"), e)
            detail = f"no space left on the server's disk ({e.strerror}); the request was not completed"
            return await _answer(send, 507, detail)
        if over and not replied:
            await self._refuse(send, scope, f"more than {self.max_bytes} bytes sent")

    async def _refuse(self, send, scope, what: str) -> None:
        mb = self.max_bytes / 2**20
        detail = f"the request body is too large ({what}); this server accepts at most {mb:g} MB (conf max_upload_mb)"
        logger.warning("%s %s refused: %s", scope.get("method"), scope.get("path"), detail)
        await _answer(send, 413, detail)


async def _answer(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def install(app: FastAPI, max_mb: float) -> None:
    """Put the bound inside the app's error handler (the middleware stack is built by then).

    Args:
        app: MONAI Label's FastAPI app, after start-up began.
        max_mb: the largest request body accepted, MiB.
    """
    stack = app.middleware_stack
    if stack is None:  # not started yet: build it as Starlette would on the first call
        stack = app.middleware_stack = app.build_middleware_stack()
    stack.app = UploadLimit(stack.app, int(max_mb * 2**20))  # stack is ServerErrorMiddleware
