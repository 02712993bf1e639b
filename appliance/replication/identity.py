"""The mirror's identity marker: which archive a mirror holds.

Each archive has an id of its own, a random UUID kept in the catalog
(``mirror.archive_id`` in ``meta``, made on first use, carried over by the
catalog snapshots). The first replication to a mirror writes it there as a
sealed file (:mod:`appliance.storage.sealed`, under the current master
key)::

    mirror/identity    {"archive": "<uuid>", "created": <unix time>}

Before it sends anything, the replicator reads the marker back. A marker
that does not open with the appliance's master keys (a mirror written with
another key store), or that names another archive, stops replication with
:class:`ForeignMirrorError`: packs of two archives never mix on one
mirror. A mirror without a marker gets one, unless the catalog has packs
recorded there and the mirror holds none of them: that is another disk or
server than the one replicated to so far (a swapped disk, a wiped or
re-pointed mirror), and is refused too. A mirror that gets its marker gets
a catalog snapshot at the next round, whenever the last one was sent.

``appliance replication verify`` runs the same checks first, writing
nothing (:func:`vet_mirror`): on a wrong mirror every pack would seem
lost, and the whole archive be queued again. It takes a mirror without a
marker as a new one only when told so (``--new-mirror``).

A catalog without an id (one rebuilt from the mirror's journal or packs)
takes the id of a marker that opens with its keys, if the mirror holds
the packs the catalog records there; a catalog that records none (a new
appliance given another archive's escrowed keys) is refused.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from appliance.catalog import replication
from appliance.catalog.archive import archive_id, keep_archive_id
from appliance.catalog.store import Catalog
from appliance.errors import (
    ForeignMirrorError,
    KeyStoreError,
    StorageError,
    UnknownMirrorError,
)
from appliance.storage import sealed
from appliance.storage.keys import KeyStore
from appliance.storage.streams import reader_over

logger = logging.getLogger(__name__)

MARKER = "mirror/identity"
# Recorded packs looked for on a mirror that has no marker.
_PACKS_LOOKED_FOR = 3


def check_mirror(catalog: Catalog, transport: Any, keys: KeyStore, spool: Path) -> str:
    """Make sure the mirror is this archive's, writing its marker if it has
    none; the archive id. Raises ForeignMirrorError when it is not."""
    theirs = vet_mirror(catalog, transport, keys)
    if not theirs:
        return _mark(catalog, transport, keys, spool, archive_id(catalog))
    if not archive_id(catalog):
        return _adopt(catalog, theirs)
    return theirs


def vet_mirror(
    catalog: Catalog, transport: Any, keys: KeyStore, new_mirror: bool = False
) -> str:
    """The checks of :func:`check_mirror`, writing nothing (neither the
    marker nor the archive id), for whoever reads the mirror before
    anything is sent to it; the archive id its marker names, empty when it
    has none. Raises ForeignMirrorError when the mirror is refused. A
    mirror without a marker that holds none of the recorded packs is
    refused (UnknownMirrorError) unless it is a ``new_mirror``, one the
    administrator moves the archive to."""
    if transport.size(MARKER) is None:
        if not new_mirror:
            _refuse_unknown(catalog, transport)
        return ""
    theirs = _read_marker(transport, keys)
    mine = archive_id(catalog)
    if not mine:
        _refuse_unadoptable(catalog, transport, theirs)
    elif theirs != mine:
        raise ForeignMirrorError(
            f"the mirror holds another archive (id {theirs}; this appliance's "
            f"is {mine}): nothing is sent to it. Point mirror settings at "
            "this appliance's mirror, or give this appliance an empty one"
        )
    return theirs


def _refuse_unknown(catalog: Catalog, transport: Any) -> None:
    """Refuse a mirror without a marker that holds none of the packs
    recorded there: not the one replicated to so far."""
    recorded = replication.offsite_packs(catalog)
    if recorded and not _holds_any(transport, recorded):
        raise UnknownMirrorError(
            f"the mirror has no identity marker and none of the {len(recorded)} "
            "pack(s) recorded as sent to it: it is not the mirror replicated to "
            "so far (another disk or server?). Nothing is sent to it; put the "
            "mirror back, or see docs/replication.md (A new mirror)"
        )


def _refuse_unadoptable(catalog: Catalog, transport: Any, theirs: str) -> None:
    """A catalog without an id takes the id of the marked mirror it was
    rebuilt from: one whose recorded packs are on it. A catalog that
    records none (a new appliance given another's escrowed keys) would
    join that archive and mix its packs and snapshots into it: refused."""
    recorded = replication.offsite_packs(catalog)
    if not recorded or not _holds_any(transport, recorded):
        raise ForeignMirrorError(
            f"the mirror holds archive {theirs} and this catalog records none "
            "of its packs: nothing is sent to it. To rebuild that archive "
            "here, run 'appliance restore --from mirror'; to start a new "
            "archive, give this appliance an empty mirror"
        )


def _mark(
    catalog: Catalog, transport: Any, keys: KeyStore, spool: Path, mine: str
) -> str:
    """Write the marker on a mirror that has none (one that may be this
    archive's mirror)."""
    if not mine:
        # Recorded only if nothing (a volume being labelled) made one since.
        mine = keep_archive_id(catalog, str(uuid.uuid4()))
    data = json.dumps({"archive": mine, "created": int(time.time())}).encode()
    with tempfile.TemporaryDirectory(dir=spool) as folder:
        path = Path(folder) / "identity"
        with open(path, "wb") as out:
            digest = sealed.seal(io.BytesIO(data), out, MARKER, keys)
        transport.put(MARKER, path, path.stat().st_size, digest)
    # A mirror just marked holds no catalog snapshot, and the journal it
    # gets starts where the last mirror's stopped: until a snapshot is
    # there, a restore from it has no catalog history. One goes next.
    replication.set_mirror_mark(catalog, "snapshot_time", 0)
    logger.info("mirror: identity marker written (archive %s)", mine)
    return mine


def _adopt(catalog: Catalog, theirs: str) -> str:
    """Take the id of the marked mirror (one that may be adopted) for a
    catalog without one."""
    kept = keep_archive_id(catalog, theirs)
    if kept != theirs:
        raise ForeignMirrorError(
            f"the mirror holds archive {theirs}, and this appliance was given "
            f"id {kept} meanwhile (a volume labelled): nothing is sent to it"
        )
    logger.info("mirror: this catalog takes the mirror's archive id %s", theirs)
    return theirs


def marker_archive(transport: Any, keys: KeyStore) -> str:
    """The archive id the mirror's marker names; empty when it has none, or
    none that opens with ``keys`` (a restore then has nothing to compare)."""
    if transport.size(MARKER) is None:
        return ""
    try:
        return _read_marker(transport, keys)
    except ForeignMirrorError as exc:
        logger.warning("mirror: %s", exc)
        return ""


def _holds_any(transport: Any, recorded: list[Any]) -> bool:
    """Whether the mirror holds one of the newest recorded packs whole."""
    newest = sorted(recorded, key=lambda pack: pack.pack_id)[-_PACKS_LOOKED_FOR:]
    return any(transport.size(pack.location) == pack.size for pack in newest)


def _read_marker(transport: Any, keys: KeyStore) -> str:
    """The archive id the mirror's marker names."""
    stream = reader_over(iter(transport.get(MARKER)))
    out = io.BytesIO()
    try:
        sealed.open_sealed(stream, MARKER, keys, out)
        archive = json.loads(out.getvalue())["archive"]
    except KeyStoreError as exc:
        raise ForeignMirrorError(
            "the mirror was written with another master key (its identity "
            f"marker does not open: {exc}): it holds another archive, or this "
            "appliance's keys were not imported from its escrow. Nothing is "
            "sent to it"
        ) from exc
    except (StorageError, ValueError, KeyError, TypeError) as exc:
        raise ForeignMirrorError(
            f"the mirror's identity marker {MARKER} is damaged ({exc}): "
            "nothing is sent to it until it is checked"
        ) from exc
    finally:
        stream.close()
    if not isinstance(archive, str) or not archive:
        raise ForeignMirrorError(f"the mirror's identity marker {MARKER} is damaged")
    return archive
