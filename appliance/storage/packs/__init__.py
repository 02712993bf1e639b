"""Study packs: the unit of storage below the online tier.

A pack is a POSIX tar stream that ``tar`` alone can list and unpack::

    +-----------+--------------+-----+--------------+-----------+---------+------+
    | pack.json | instances/   | ... | instances/   | manifest. | trailer | NULs |
    | (clear)   | 000001.dcm.  |     | 00000N.dcm.  | json.zst  | .json   |      |
    |           | zst[.enc]    |     | zst[.enc]    | [.enc]    | (clear) |      |
    +-----------+--------------+-----+--------------+-----------+---------+------+

One zstd frame per instance, encrypted with AES-256-GCM under the pack's
own data key when the pack is encrypted; the manifest lists every instance
with its UIDs, checksums and catalog attributes, so that a catalog can be
rebuilt from packs alone. ``docs/pack-format.md`` describes every byte.

Modules: ``tar`` (headers and records), ``sealing`` (compression and
encryption of one member), ``manifest`` (the JSON members), ``writer``,
``reader`` and ``report`` (the outcome of reading a whole pack).
"""

from appliance.storage.packs.manifest import InstanceMeta, Manifest, PackedInstance
from appliance.storage.packs.reader import PackReader
from appliance.storage.packs.report import InstanceCheck, VerifyReport
from appliance.storage.packs.tar import DEFAULT_RECORD_SIZE, TAPE_RECORD_SIZE
from appliance.storage.packs.writer import (
    DEFAULT_LEVEL,
    PackSummary,
    PackWriter,
    write_pack_file,
)

__all__ = [
    "DEFAULT_LEVEL",
    "DEFAULT_RECORD_SIZE",
    "TAPE_RECORD_SIZE",
    "InstanceCheck",
    "InstanceMeta",
    "Manifest",
    "PackReader",
    "PackSummary",
    "PackWriter",
    "PackedInstance",
    "VerifyReport",
    "write_pack_file",
]
