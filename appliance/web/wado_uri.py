"""WADO-URI (PS3.18 9): one instance by its three UIDs in the query string,
for viewers older than DICOMweb. Only contentType=application/dicom is
offered: the instance exactly as stored."""

from __future__ import annotations

import logging

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute

from appliance.web import multipart
from appliance.web.accounts import VIEWER
from appliance.web.archive import sent_bytes
from appliance.web.auth import problem, route
from appliance.web.dicomweb import acceptable, audit_retrieval, fetch, is_one_uid

logger = logging.getLogger(__name__)

_UID_PARAMETERS = ("studyUID", "seriesUID", "objectUID")
# Parameters that take one value: given twice, which was meant cannot be
# told (two objectUIDs name two instances, and only one would be sent).
_SINGLE = ("requestType", *_UID_PARAMETERS, "contentType", "transferSyntax")


async def wado(request: Request) -> Response:
    """GET /wado?requestType=WADO&studyUID=..&seriesUID=..&objectUID=.."""
    params = request.query_params
    repeated = [name for name in _SINGLE if len(params.getlist(name)) > 1]
    if repeated:
        return problem(400, f"{', '.join(repeated)} given more than once")
    if params.get("requestType") != "WADO":
        return problem(400, "requestType must be WADO")
    missing = [name for name in _UID_PARAMETERS if not params.get(name)]
    if missing:
        return problem(400, f"missing {', '.join(missing)}")
    # PS3.18 makes contentType a list of media types with preferences, as an
    # Accept header is.
    content_types = acceptable(params.get("contentType", "application/dicom"))
    if all(kind.type != "application/dicom" for kind in content_types):
        return problem(
            406, "only contentType=application/dicom is offered (no rendering)"
        )
    if "anonymize" in params:
        # PS3.18 9: a server that cannot de-identify answers an error; the
        # stored instance would hand over the identity the caller meant to
        # be spared.
        return problem(400, "anonymize is not supported: instances are sent as stored")
    study, series, instance = (params[name] for name in _UID_PARAMETERS)
    if not all(is_one_uid(value) for value in (study, series, instance)):
        return problem(
            400,
            "a UID is at most 64 characters, without * ? \\ or control "
            "characters, and does not start or end with a space",
        )

    items = await fetch(request, study, series, instance)
    if isinstance(items, Response):
        return items
    item = items[0]
    wanted = params.get("transferSyntax")
    if wanted and wanted != item.transfer_syntax:
        return problem(
            406,
            f"the instance is stored in transfer syntax {item.transfer_syntax}; "
            "it is not converted",
        )
    assert item.path is not None
    await run_in_threadpool(audit_retrieval, request, [item])
    if item.patient is not None:
        coerced = await run_in_threadpool(sent_bytes, item)
        return Response(coerced, media_type="application/dicom")
    return StreamingResponse(
        multipart.stream_file(item.path), media_type="application/dicom"
    )


ROUTES: list[BaseRoute] = [route("/wado", wado, VIEWER)]
