"""One offline volume checked against the catalog (``appliance volumes
verify``): each pack the catalog records on it looked for at its position
and read back whole, as the scrub reads an offline copy."""

from __future__ import annotations

import logging

from appliance.catalog.copies import PackRecord
from appliance.catalog.store import Catalog
from appliance.errors import ApplianceError, VolumeNotReachable
from appliance.hsm.tiers import OFFLINE
from appliance.storage.keys import KeyStore
from appliance.storage.offline import OfflineTier, pack_location
from appliance.storage.volumes import PackLocation

logger = logging.getLogger(__name__)


class VolumeCheck:
    """The packs the catalog records on one volume, against what it holds.

    A pack counts as good only when the volume holds, at the position the
    catalog records, a pack of the catalog's id whose bytes read back with
    the catalog's size and SHA-256 and whose every instance checks out.
    Another volume of the same label and archive (swapped on the way back
    from the vault, say) holds other packs at the same positions: none of
    them is taken for the catalog's. Nothing is written: the scrub repairs.
    """

    def __init__(
        self,
        catalog: Catalog,
        offline: OfflineTier,
        keys: KeyStore | None,
        volume: str,
    ) -> None:
        self.offline = offline
        self.keys = keys
        self.volume = volume
        self.recorded = recorded_on(catalog, volume)
        self.found = {p.position: p for p in offline.library.list_packs(volume)}
        self.read = 0
        self.bad = 0
        self.missing = 0

    @property
    def unrecorded(self) -> int:
        """Packs on the volume at positions where the catalog records none
        (their copies released or replaced since): not read, not counted."""
        recorded = {_position(pack.location) for pack in self.recorded}
        return len(set(self.found) - recorded)

    def problem(self, pack: PackRecord) -> str | None:
        """What is wrong with ``pack`` on the volume, in one line naming
        the volume, the position, what the catalog expects and what was
        found; None when it reads back good. Counted as read, bad or
        missing."""
        expected = self._expected(pack)
        where = f"volume {self.volume} position {expected.position}"
        wanted = f"the catalog expects pack {pack.pack_id} (SHA-256 {pack.sha256})"
        found = self.found.get(expected.position)
        if found is None:
            self.missing += 1
            return f"{where}: {wanted}; the volume holds no pack there"

        self.read += 1
        if (found.pack_id, found.sha256) != (pack.pack_id, pack.sha256):
            self.bad += 1
            return (
                f"{where}: {wanted}; the volume holds pack {found.pack_id} "
                f"(SHA-256 {found.sha256})"
            )

        why = self._read_back(expected)
        if why is None:
            return None
        self.bad += 1
        return f"{where}: {wanted}; {why}"

    def describe(self) -> str:
        """One line: the packs read, those bad, those missing."""
        line = (
            f"volume {self.volume}: {self.read} pack(s) read, {self.bad} bad, "
            f"{self.missing} missing"
        )
        if self.unrecorded:
            # Copies released or replaced since they were written there: the
            # volume keeps them (it is written once); the catalog counts none.
            line += (
                f"; {self.unrecorded} other pack(s) on the volume that the "
                "catalog does not record there, not read"
            )
        return line

    def _read_back(self, expected: PackLocation) -> str | None:
        """Why the pack does not read back as recorded; None when it does.
        The library refuses a pack of another id, or other bytes, as it
        does for a recall."""
        try:
            report = self.offline.verify(expected, self.keys)
        except VolumeNotReachable:
            raise  # taken out meanwhile: no pack after it can be read either
        except (ApplianceError, OSError) as exc:
            return str(exc)
        return None if report.ok else report.describe()

    def _expected(self, pack: PackRecord) -> PackLocation:
        return pack_location(pack.location, pack.pack_id, pack.size, pack.sha256)


def recorded_on(catalog: Catalog, volume: str) -> list[PackRecord]:
    """The packs the catalog records on ``volume``, in the order of their
    positions there."""
    with catalog.read() as txn:
        packs = [
            PackRecord.from_json(data)
            for _key, data in catalog.all_records(txn, "packs")
            if data.get("tier") == OFFLINE
            and data["location"].partition("/")[0] == volume
        ]
    return sorted(packs, key=lambda pack: _position(pack.location))


def _position(location: str) -> int:
    position = location.partition("/")[2]
    return int(position) if position.isdigit() else 0
