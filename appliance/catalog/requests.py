"""Operator requests: what the appliance needs a person to do, such as
loading a volume that is on the shelf.

One open request per volume gathers every study waiting for it, so that
recalls of the same volume are served by one mount. When the volume is
marked loaded its studies are recalled; each recall takes its study off,
and the request closes when no study waits for it any more.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import lmdb

from appliance.catalog.store import Catalog, encode_key
from appliance.errors import CatalogError

logger = logging.getLogger(__name__)

LOAD_VOLUME = "load_volume"


@dataclass
class OperatorRequest:
    """One thing an administrator is asked to do."""

    request_id: str
    kind: str
    volume: str
    reason: str
    created: float = field(default_factory=time.time)
    studies: list[str] = field(default_factory=list)

    def describe(self) -> str:
        count = len(self.studies)
        noun = "study" if count == 1 else "studies"
        waiting = f"; {count} {noun} waiting" if count else ""
        return f"load volume {self.volume}: {self.reason}{waiting}"

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["key"] = self.request_id
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OperatorRequest:
        data = dict(data)
        data.pop("key", None)
        return cls(**data)


def request_volume(
    catalog: Catalog, volume: str, reason: str, study_uid: str | None = None
) -> OperatorRequest:
    """Ask for ``volume`` to be loaded (once), adding ``study_uid`` to what
    waits for it; returns the open request."""
    request_id = f"load-{volume}"
    try:
        with catalog.env.begin(write=True) as txn:
            data = catalog.get(txn, "requests", request_id)
            request = (
                OperatorRequest.from_json(data)
                if data is not None
                else OperatorRequest(request_id, LOAD_VOLUME, volume, reason)
            )
            is_new = data is None
            if study_uid and study_uid not in request.studies:
                request.studies.append(study_uid)
            catalog._put(txn, "requests", request_id, request.as_json())
    except lmdb.Error as exc:
        raise CatalogError(f"cannot record a request for {volume}: {exc}") from exc
    if is_new:
        logger.warning("operator request: %s", request.describe())
    return request


def open_requests(catalog: Catalog) -> list[OperatorRequest]:
    """Every open request, oldest first."""
    with catalog.read() as txn:
        found = [
            OperatorRequest.from_json(data)
            for _key, data in catalog.all_records(txn, "requests")
        ]
    return sorted(found, key=lambda request: request.created)


def volume_loaded(catalog: Catalog, volume: str) -> list[str]:
    """The studies that wait for ``volume``, now loaded, to recall.

    Their request stays open until each one's recall has run (and taken
    its study off, :func:`study_recalled`): a recall stopped before it ran,
    by Ctrl-C or a crash, leaves its study asked for, to be recalled when
    the volume is said to be loaded again. A request that no study waits
    for (a restore's) is closed here."""
    request_id = f"load-{volume}"
    try:
        with catalog.env.begin(write=True) as txn:
            data = catalog.get(txn, "requests", request_id)
            if data is None:
                return []
            studies = list(data.get("studies", []))
            if not studies:
                txn.delete(encode_key(request_id), db=catalog.db["requests"])
    except lmdb.Error as exc:
        raise CatalogError(f"cannot read the request for {volume}: {exc}") from exc
    if not studies:
        logger.info("operator request for volume %s done", volume)
    return studies


def study_recalled(
    catalog: Catalog, study_uid: str, waiting_for: Sequence[str] = ()
) -> None:
    """A recall of the study has run: it waits only for the volumes in
    ``waiting_for`` now (asked for by that recall), no longer for any other;
    a request left with no study is closed (its volume came back, whether
    or not it was said with ``appliance volumes loaded``)."""
    if not _waits_elsewhere(catalog, study_uid, waiting_for):
        return
    try:
        with catalog.env.begin(write=True) as txn:
            for key, data in list(catalog.all_records(txn, "requests")):
                if data.get("volume") in waiting_for:
                    continue
                if study_uid not in data.get("studies", []):
                    continue
                data["studies"].remove(study_uid)
                if data["studies"]:
                    catalog._put(txn, "requests", key, data)
                else:
                    txn.delete(encode_key(key), db=catalog.db["requests"])
                    logger.info("operator request %s done", key)
    except lmdb.Error as exc:
        raise CatalogError(f"cannot update operator requests: {exc}") from exc


def _waits_elsewhere(
    catalog: Catalog, study_uid: str, waiting_for: Sequence[str]
) -> bool:
    """Whether a request for a volume not in ``waiting_for`` lists the
    study: most recalls change nothing, and need no write transaction."""
    return any(
        request.volume not in waiting_for and study_uid in request.studies
        for request in open_requests(catalog)
    )
