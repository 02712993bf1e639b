"""DICOMweb routes: QIDO-RS, WADO-RS and STOW-RS (PS3.18 10.4 to 10.6).

Every catalog, file and recall step runs in the thread pool; the event
loop only moves bytes. UIDs in the path are data: they are looked up in
the catalog and never become file names.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute

from appliance.audit.dicom import query_answered, retrieved
from appliance.audit.events import Peer
from appliance.dicom.find import STUDY_ROOT_FIND
from appliance.errors import OutOfSpaceError
from appliance.web import multipart, qido, stow
from appliance.web.accounts import OPERATOR, VIEWER
from appliance.web.archive import Archive, Located, NotFound, NotOnline, sent_bytes
from appliance.web.auth import problem, route
from appliance.web.content_coding import refused_coding
from appliance.web.metadata import metadata_of

logger = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
# A transfer-syntax parameter that admits every transfer syntax.
ANY_SYNTAX = "*"
# Seconds a client is asked to wait for an operator to load a volume.
RETRY_AFTER = 300
# At most this many failure reasons go into Warning headers.
_REASONS_SHOWN = 20
# What is read and dropped of a refused STOW-RS body before the answer.
_DRAINED = 1 << 20
# A UID in a URL: anything but the wildcards and list separator of C-FIND,
# which would turn one study into a search. (The router keeps '/' out of a
# path parameter.)
_ONE_UID = re.compile(r"^[^*?\\]{1,64}$")
_AGENT_JUNK = re.compile(r"[^A-Za-z0-9.:\[\]_-]")


class BodyStalled(Exception):
    """No byte of a request body arrived for ``web.stow_stall_timeout``."""


def archive_of(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def uids(request: Request, *names: str) -> list[str]:
    """The path's UIDs; ValueError when one could be taken for a pattern."""
    found = []
    for name in names:
        value = request.path_params[name]
        if not is_one_uid(value):
            raise ValueError(f"{name} is not a UID")
        found.append(value)
    return found


def is_one_uid(value: str) -> bool:
    """Whether a UID from a URL names one UID: at most 64 characters, none
    of C-FIND's wildcards or list separator, no control character, and no
    padding at either end, which matching trims: a UID of nothing but
    padding (%00 or %20) would match every instance in the archive."""
    return (
        bool(_ONE_UID.match(value))
        and value.isprintable()
        and value == value.strip(" ")
    )


# -- QIDO-RS --------------------------------------------------------------------


async def search_studies(request: Request) -> Response:
    return await _search(request, qido.STUDY, ())


async def search_series(request: Request) -> Response:
    return await _search(request, qido.SERIES, ())


async def search_study_series(request: Request) -> Response:
    return await _search(request, qido.SERIES, ("study",))


async def search_instances(request: Request) -> Response:
    return await _search(request, qido.IMAGE, ())


async def search_study_instances(request: Request) -> Response:
    return await _search(request, qido.IMAGE, ("study",))


async def search_series_instances(request: Request) -> Response:
    return await _search(request, qido.IMAGE, ("study", "series"))


_WITHIN_KEYS = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID"}


async def _search(request: Request, level: str, names: tuple[str, ...]) -> Response:
    if not accepts_json(request.headers.get("accept", "")):
        # PS3.18 8.7: results in a type the caller did not ask for would be
        # taken for what it asked for.
        return problem(406, "search results are offered as application/dicom+json only")
    try:
        within = dict(
            zip((_WITHIN_KEYS[n] for n in names), uids(request, *names), strict=True)
        )
        search = qido.parse(level, request.query_params.multi_items(), within)
        most: int = request.app.state.config.get("web.qido_max_results")
        results = await run_in_threadpool(
            qido.run, archive_of(request).catalog, search, most
        )
    except ValueError as exc:
        return problem(400, f"cannot search: {exc}")
    await run_in_threadpool(_audit_search, request, search)
    headers = _search_warnings(request, search)
    if not results:
        return Response(status_code=204, headers=headers)
    return JSONResponse(results, media_type=DICOM_JSON, headers=headers)


def _search_warnings(request: Request, search: qido.Search) -> dict[str, str]:
    """The Warning header naming what the search left undone (PS3.18
    8.3.4): code 299 and, as agent, the service (its host and port)."""
    texts = qido.warnings(search)
    if not texts:
        return {}
    logger.info(
        "QIDO-RS from DICOMweb account %s: not supported, so not done: %s",
        request.state.account,
        "; ".join(texts),
    )
    # The Host header names the service as the caller reached it; only
    # what a host and port may hold goes into the header.
    agent = _AGENT_JUNK.sub("", request.url.netloc) or "pacs-appliance"
    return {"Warning": ", ".join(f'299 {agent} "{_quoted(text)}"' for text in texts)}


def _audit_search(request: Request, search: qido.Search) -> None:
    """A search, recorded as a C-FIND would be, with the URL's query."""
    trail = archive_of(request).tiers.audit
    if trail is not None:
        query = str(request.url.query).encode()
        identifier = qido.identifier_of(search)
        caller = caller_of(request)
        query_answered(trail, caller, STUDY_ROOT_FIND, query, "", identifier)


def caller_of(request: Request) -> Peer:
    """The account that asked, and from where, for the audit trail."""
    address = request.client.host if request.client else ""
    return Peer(str(request.state.account), address, account=True)


def audit_retrieval(request: Request, items: list[Located]) -> None:
    """Instances sent (or their metadata), recorded as a C-GET's would be."""
    archive = archive_of(request)
    if archive.tiers.audit is not None:
        retrieved(
            archive.tiers.audit, archive.catalog, caller_of(request), None, items, [], 0
        )


# -- WADO-RS --------------------------------------------------------------------


async def retrieve_study(request: Request) -> Response:
    return await _retrieve(request, ("study",))


async def retrieve_series(request: Request) -> Response:
    return await _retrieve(request, ("study", "series"))


async def retrieve_instance(request: Request) -> Response:
    return await _retrieve(request, ("study", "series", "instance"))


async def study_metadata(request: Request) -> Response:
    return await _metadata(request, ("study",))


async def series_metadata(request: Request) -> Response:
    return await _metadata(request, ("study", "series"))


async def instance_metadata(request: Request) -> Response:
    return await _metadata(request, ("study", "series", "instance"))


async def _retrieve(request: Request, names: tuple[str, ...]) -> Response:
    syntaxes = dicom_syntaxes(request.headers.get("accept", ""))
    if not syntaxes:
        return problem(
            406,
            'only multipart/related; type="application/dicom" is offered: '
            "the instances as they were stored",
        )
    items = await located(request, names)
    if isinstance(items, Response):
        return items
    unwanted = sorted({i.transfer_syntax for i in items} - syntaxes)
    if ANY_SYNTAX not in syntaxes and unwanted:
        return problem(
            406,
            f"instances are stored in transfer syntax {', '.join(unwanted)} and "
            "are not converted; ask for it, or for transfer-syntax=*",
        )
    await run_in_threadpool(audit_retrieval, request, items)
    boundary = multipart.new_boundary()
    parts = [(_part_type(item), _source(item)) for item in items]
    return StreamingResponse(
        multipart.stream_files(parts, boundary),
        media_type=(
            f'multipart/related; type="application/dicom"; boundary={boundary}'
        ),
    )


async def _metadata(request: Request, names: tuple[str, ...]) -> Response:
    if not accepts_json(request.headers.get("accept", "")):
        # PS3.18 8.7: a client asking for XML only must not get JSON as if
        # it were what it asked for.
        return problem(406, "only application/dicom+json metadata is offered")
    items = await located(request, names)
    if isinstance(items, Response):
        return items
    body = await run_in_threadpool(
        metadata_of, [(_path(item), item.patient) for item in items]
    )
    await run_in_threadpool(audit_retrieval, request, items)
    return JSONResponse(body, media_type=DICOM_JSON)


async def located(request: Request, names: tuple[str, ...]) -> list[Located] | Response:
    """The online instances the path names, recalled if need be; or the
    error response (400, 404, 503)."""
    try:
        found = uids(request, *names)
    except ValueError as exc:
        return problem(400, str(exc))
    study, more = found[0], [*found[1:], None, None]
    return await fetch(request, study, more[0], more[1])


async def fetch(
    request: Request, study: str, series: str | None, instance: str | None
) -> list[Located] | Response:
    """The online instances of the UIDs, recalled if need be; or the error
    response (404, 503)."""
    try:
        return await run_in_threadpool(
            archive_of(request).retrieve, study, series, instance
        )
    except NotFound as exc:
        return problem(404, str(exc))
    except NotOnline as exc:
        headers = {"Retry-After": str(RETRY_AFTER)} if exc.volumes else None
        return problem(503, str(exc), headers)


def dicom_syntaxes(accept: str) -> set[str]:
    """The transfer syntaxes in which an Accept header admits Part 10 files
    (PS3.18 8.7.3.5): ``ANY_SYNTAX`` for any; empty when it admits none.
    A media type without a transfer-syntax parameter admits any: the files
    are sent as stored, never converted."""
    if not accept.strip():
        return {ANY_SYNTAX}
    found = set()
    for media_type in acceptable(accept):
        kind = media_type.type
        if kind == "multipart/related":
            kind = media_type.parameters.get("type", "application/dicom").lower()
        if kind in ("*/*", "multipart/*", "application/dicom"):
            found.add(media_type.parameters.get("transfer-syntax", ANY_SYNTAX))
    return found


def accepts_json(accept: str) -> bool:
    """Whether an Accept header admits metadata as DICOM JSON."""
    if not accept.strip():
        return True
    admitted = {"*/*", "application/*", "application/json", DICOM_JSON}
    return any(media_type.type in admitted for media_type in acceptable(accept))


def acceptable(accept: str) -> list[multipart.MediaType]:
    """The media types of an Accept header but those it refuses (q=0)."""
    found = []
    for item in accept.split(","):
        media_type = multipart.MediaType.parse(item)
        try:
            refused = float(media_type.parameters.get("q", "1")) == 0
        except ValueError:
            refused = False
        if not refused:
            found.append(media_type)
    return found


def _part_type(item: Located) -> str:
    return f"application/dicom; transfer-syntax={item.transfer_syntax}"


def _source(item: Located) -> Path | Callable[[], bytes]:
    """The stored file, or for a patient registration corrected, the
    function that makes the coerced copy to send."""
    if item.patient is None:
        return _path(item)
    return functools.partial(sent_bytes, item)


def _path(item: Located) -> Path:
    # Archive.retrieve returns only instances that are online.
    assert item.path is not None
    return item.path


# -- STOW-RS --------------------------------------------------------------------


async def store_instances(request: Request) -> Response:
    return await _store(request, None)


async def store_study_instances(request: Request) -> Response:
    try:
        (study,) = uids(request, "study")
    except ValueError as exc:
        return problem(400, str(exc))
    return await _store(request, study)


async def _store(request: Request, study: str | None) -> Response:
    refused = refused_coding(request)
    if refused is not None:
        return refused
    media_type = multipart.MediaType.parse(request.headers.get("content-type", ""))
    if media_type.type != "multipart/related":
        return problem(
            415, 'send multipart/related; type="application/dicom" (PS3.18 10.5)'
        )
    if media_type.parameters.get("type", "application/dicom").lower() != (
        "application/dicom"
    ):
        return problem(415, "only application/dicom parts are stored")
    boundary = media_type.parameters.get("boundary", "")
    if not boundary:
        return problem(400, "the Content-Type names no boundary")

    archive = archive_of(request)
    length = request.headers.get("content-length", "")
    limit: int = request.app.state.config.get("web.max_stow_bytes")
    if length.isdigit() and int(length) > limit:
        return _too_large(request, limit)
    try:
        # The body is spooled to the online tier: it must not eat the reserve.
        archive.online.check_room(2 * int(length) if length.isdigit() else 0)
    except OutOfSpaceError as exc:
        return problem(507, f"{exc}; nothing was stored")
    body = archive.incoming / f"{secrets.token_hex(16)}.body"
    try:
        if not await _spool(request, body, limit):
            return _too_large(request, limit)
        parts = await run_in_threadpool(
            multipart.split, body, boundary, archive.incoming
        )
    except multipart.BadMultipart as exc:
        return problem(400, f"malformed multipart body: {exc}; nothing was stored")
    except ClientDisconnect:
        # The caller hung up (or its framing broke) before the body ended:
        # no one reads the answer, but the log says what happened in a line.
        logger.warning(
            "STOW-RS from DICOMweb account %s: the connection ended before "
            "the body did; nothing was stored",
            request.state.account,
        )
        return problem(400, "the body ended early; nothing was stored")
    except BodyStalled:
        return _stalled(request)
    finally:
        await run_in_threadpool(_remove, body)
    return await _store_parts(request, archive, parts, study)


async def _store_parts(
    request: Request,
    archive: Archive,
    parts: list[tuple[multipart.MediaType, Path]],
    study: str | None,
) -> Response:
    wrong = [
        f"part {number} is {media_type.type}"
        for number, (media_type, _path) in enumerate(parts, start=1)
        if media_type.type != "application/dicom"
    ]
    if wrong or not parts:
        for _media_type, path in parts:
            await run_in_threadpool(_remove, path)
        reason = ", ".join(wrong) + ", not application/dicom" if wrong else "no part"
        return problem(400, f"{reason}; nothing was stored")

    source = f"DICOMweb account {request.state.account}"
    answer = await run_in_threadpool(
        stow.store_parts,
        archive,
        [path for _media_type, path in parts],
        study,
        source,
        base_url(request),
        caller_of(request),
    )
    headers = {}
    if answer.reasons:
        shown = answer.reasons[:_REASONS_SHOWN]
        headers["Warning"] = ", ".join(
            f'299 pacs-appliance "{_quoted(reason)}"' for reason in shown
        )
    return JSONResponse(
        answer.body, status_code=answer.status, media_type=DICOM_JSON, headers=headers
    )


async def _spool(request: Request, body: Path, limit: int) -> bool:
    """Write the request body to ``body`` as it arrives; False, having
    stopped reading, once it is longer than ``limit`` bytes (a chunked body
    announces no length). BodyStalled when no byte arrives for
    ``web.stow_stall_timeout`` seconds."""
    written = 0
    stall: float = request.app.state.config.get("web.stow_stall_timeout")
    handle = await run_in_threadpool(open, body, "wb")
    try:
        chunks = request.stream()
        while True:
            # A caller that stops sending without hanging up would hold the
            # connection and the spooled part for ever.
            try:
                async with asyncio.timeout(stall):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise BodyStalled from None
            written += len(chunk)
            if written > limit:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(stall):
                        await _drain(chunks)
                return False
            if chunk:
                await run_in_threadpool(handle.write, chunk)
    finally:
        await run_in_threadpool(handle.close)
    return True


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Read and drop what is left of a refused body, up to ``_DRAINED``
    bytes: a connection closed with bytes unread is reset, and the reset
    can destroy the answer before the client reads it."""
    drained = 0
    try:
        async for chunk in chunks:
            drained += len(chunk)
            if drained > _DRAINED:
                return
    except ClientDisconnect:
        return


def _too_large(request: Request, limit: int) -> Response:
    """413 for a body over ``web.max_stow_bytes``; the connection is closed
    after the answer, so that no more of the body is read."""
    logger.warning(
        "STOW-RS from DICOMweb account %s refused: the body is longer than "
        "web.max_stow_bytes (%d bytes); nothing was stored",
        request.state.account,
        limit,
    )
    return problem(
        413,
        f"the body is longer than the {limit} bytes this server takes in one "
        "request (web.max_stow_bytes); send fewer instances per request; "
        "nothing was stored",
        {"Connection": "close"},
    )


def _stalled(request: Request) -> Response:
    """408 for a body that stopped arriving; the connection is closed after
    the answer, as the rest of the body may still come."""
    stall = request.app.state.config.get("web.stow_stall_timeout")
    logger.warning(
        "STOW-RS from DICOMweb account %s: no byte of the body arrived for "
        "%g s (web.stow_stall_timeout); nothing was stored",
        request.state.account,
        stall,
    )
    return problem(
        408,
        f"no byte of the body arrived for {stall:g} s; nothing was stored",
        {"Connection": "close"},
    )


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _quoted(text: str) -> str:
    # A header value is Latin-1 without line breaks or unescaped quotes.
    cleaned = " ".join(text.split()).replace("\\", "\\\\").replace('"', '\\"')
    return cleaned.encode("latin-1", "replace").decode("latin-1")


def _routes() -> list[Any]:
    study = "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    return [
        route("/studies", search_studies, VIEWER),
        route("/studies", store_instances, OPERATOR, methods=("POST",)),
        route(study, retrieve_study, VIEWER),
        route(study, store_study_instances, OPERATOR, methods=("POST",)),
        route(study + "/metadata", study_metadata, VIEWER),
        route(study + "/series", search_study_series, VIEWER),
        route(study + "/instances", search_study_instances, VIEWER),
        route(series, retrieve_series, VIEWER),
        route(series + "/metadata", series_metadata, VIEWER),
        route(series + "/instances", search_series_instances, VIEWER),
        route(instance, retrieve_instance, VIEWER),
        route(instance + "/metadata", instance_metadata, VIEWER),
        route("/series", search_series, VIEWER),
        route("/instances", search_instances, VIEWER),
    ]


ROUTES: list[BaseRoute] = _routes()
