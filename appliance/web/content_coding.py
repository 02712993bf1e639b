"""Request bodies are taken as sent (content coding ``identity``) only.

A body compressed by the client (``Content-Encoding: gzip``) would
otherwise be read as if it were not: a STOW-RS body as a multipart message
with no boundary in it, an action's body as JSON that does not parse. The
caller is told what is wrong instead (RFC 9110 15.5.16: 415, with the
codings this server takes in ``Accept-Encoding``).
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import Response

from appliance.web.auth import problem

logger = logging.getLogger(__name__)

IDENTITY = "identity"


def refused_coding(request: Request) -> Response | None:
    """The 415 answer for a body sent with a content coding; None when the
    body is sent as it is."""
    header = request.headers.get("content-encoding", "")
    codings = [item.strip().lower() for item in header.split(",") if item.strip()]
    others = [coding for coding in codings if coding != IDENTITY]
    if not others:
        return None
    return problem(
        415,
        f"the body is sent with Content-Encoding {', '.join(others)}; this server "
        "takes request bodies as they are (identity) only; nothing was done",
        {"Accept-Encoding": IDENTITY},
    )
