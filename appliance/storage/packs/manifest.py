"""What a pack says about itself: its clear header, its manifest, its trailer.

All three are JSON. The header (``pack.json``) and the trailer
(``trailer.json``) are clear text and carry nothing about patients; the
manifest lists every instance with its UIDs, checksums and catalog
attributes, and is encrypted whenever the pack is. ``docs/pack-format.md``
shows each with an example.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

FORMAT = "pacs-appliance-pack"
MANIFEST_FORMAT = "pacs-appliance-pack-manifest"
TRAILER_FORMAT = "pacs-appliance-pack-trailer"
VERSION = 1
HEADER_MEMBER = "pack.json"
TRAILER_MEMBER = "trailer.json"
INSTANCE_FOLDER = "instances/"
CIPHER = "AES-256-GCM"
COMPRESSION = "zstd"
LEVELS = ("patient", "study", "series", "instance")
TRAILER_SIZE = 512


class VersionError(ValueError):
    """A header, manifest or trailer of a format version this code does not read."""


# The same rule as the volume libraries': pack ids become file names there.
_PACK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_pack_id(pack_id: str) -> str:
    """``pack_id`` if it is 1 to 64 letters, digits, '_' or '-'."""
    if not isinstance(pack_id, str) or not _PACK_ID.fullmatch(pack_id):
        raise ValueError(
            "pack_id must be 1 to 64 letters, digits, '_' or '-', starting "
            f"with a letter or digit: {pack_id!r}"
        )
    return pack_id


def instance_member(number: int, encrypted: bool) -> str:
    """The member name of the ``number``-th instance (from 1): no UIDs in it."""
    return f"{INSTANCE_FOLDER}{number:06d}.dcm.zst" + (".enc" if encrypted else "")


def manifest_member(encrypted: bool) -> str:
    """The member name of the manifest."""
    return "manifest.json.zst" + (".enc" if encrypted else "")


@dataclass(frozen=True)
class InstanceMeta:
    """What the caller knows about an instance it puts in a pack.

    ``size`` and ``sha256`` are those of the stored Part 10 bytes and are
    checked while packing; ``content_sha256`` (of the data set after the
    file meta) and ``attributes`` (level -> keyword -> text, levels from
    :data:`LEVELS`) are recorded as given, for rebuilding a catalog.
    """

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax: str
    size: int
    sha256: str
    content_sha256: str
    attributes: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    received: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 0:
            raise ValueError(f"size must be a whole number of bytes: {self.size!r}")
        for name in ("sha256", "content_sha256"):
            if not _SHA256.fullmatch(getattr(self, name)):
                raise ValueError(f"{name} must be 64 lower-case hex digits")
        unknown = set(self.attributes) - set(LEVELS)
        if unknown:
            raise ValueError(f"attributes levels must be among {LEVELS}: {unknown}")

    def as_json(self) -> dict[str, Any]:
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "sop_class_uid": self.sop_class_uid,
            "series_uid": self.series_uid,
            "study_uid": self.study_uid,
            "transfer_syntax": self.transfer_syntax,
            "size": self.size,
            "sha256": self.sha256,
            "content_sha256": self.content_sha256,
            "received": self.received,
            "attributes": {
                level: dict(values) for level, values in self.attributes.items()
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InstanceMeta:
        attributes = data["attributes"]
        if not all(
            isinstance(values, dict)
            and all(isinstance(v, str) for v in values.values())
            for values in attributes.values()
        ):
            raise ValueError("attributes must map keywords to text")
        return cls(
            sop_instance_uid=_text(data, "sop_instance_uid"),
            sop_class_uid=_text(data, "sop_class_uid"),
            series_uid=_text(data, "series_uid"),
            study_uid=_text(data, "study_uid"),
            transfer_syntax=_text(data, "transfer_syntax"),
            size=_number(data, "size"),
            sha256=_text(data, "sha256"),
            content_sha256=_text(data, "content_sha256"),
            attributes=attributes,
            received=data["received"],
        )


@dataclass(frozen=True)
class PackedInstance:
    """An instance in a pack: what the caller gave, and where it lies."""

    meta: InstanceMeta
    member: str
    header_offset: int
    data_offset: int
    member_size: int
    compressed_size: int

    @property
    def sop_instance_uid(self) -> str:
        return self.meta.sop_instance_uid

    def as_json(self) -> dict[str, Any]:
        return {
            "member": self.member,
            "header_offset": self.header_offset,
            "data_offset": self.data_offset,
            "member_size": self.member_size,
            "compressed_size": self.compressed_size,
            **self.meta.as_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PackedInstance:
        return cls(
            meta=InstanceMeta.from_json(data),
            member=_text(data, "member"),
            header_offset=_number(data, "header_offset"),
            data_offset=_number(data, "data_offset"),
            member_size=_number(data, "member_size"),
            compressed_size=_number(data, "compressed_size"),
        )


@dataclass(frozen=True)
class Encryption:
    """How a pack is encrypted: its data key, wrapped under a master key."""

    master_key_id: str
    wrapped_data_key: bytes

    def as_json(self) -> dict[str, Any]:
        return {
            "cipher": CIPHER,
            "master_key_id": self.master_key_id,
            "wrapped_data_key": self.wrapped_data_key.hex(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Encryption | None:
        if data is None:
            return None
        if data["cipher"] != CIPHER:
            raise ValueError(f"cipher {data['cipher']!r} is not {CIPHER}")
        wrapped = bytes.fromhex(_text(data, "wrapped_data_key"))
        return cls(_text(data, "master_key_id"), wrapped)


@dataclass(frozen=True)
class PackHeader:
    """The clear first member: what a reader needs before anything else.

    ``check`` guards the header's own bytes, so that a damaged header is
    reported as such rather than, say, as an unknown master key id.
    """

    pack_id: str
    encryption: Encryption | None

    def to_bytes(self) -> bytes:
        body = {
            "format": FORMAT,
            "version": VERSION,
            "pack_id": self.pack_id,
            "compression": COMPRESSION,
            "encryption": self.encryption.as_json() if self.encryption else None,
        }
        return _canonical({**body, "check": _check_of(body)})

    @classmethod
    def from_bytes(cls, data: bytes) -> PackHeader:
        """Parse a header; ValueError says what is wrong with it."""
        document = _load(data, "the pack header")
        _check_format(document, FORMAT)
        check = document.pop("check", None)
        if check != _check_of(document):
            raise ValueError("its check value does not match: altered or damaged")
        try:
            header = cls(
                check_pack_id(_text(document, "pack_id")),
                Encryption.from_json(document["encryption"]),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"the pack header lacks or mistypes {exc}") from None
        if header.to_bytes() != data:
            raise ValueError("not in the canonical form packs are written in")
        return header


@dataclass(frozen=True)
class Manifest:
    """Everything a pack holds, for recall and for rebuilding a catalog."""

    pack_id: str
    created: str
    study_uid: str | None
    compression_level: int
    header_sha256: str
    encryption: Encryption | None
    instances: tuple[PackedInstance, ...]

    def instance(self, sop_instance_uid: str) -> PackedInstance:
        """The entry of one instance; LookupError if the pack lacks it."""
        entry = self._by_uid.get(sop_instance_uid)
        if entry is None:
            raise LookupError(
                f"pack {self.pack_id} holds no instance {sop_instance_uid}"
            )
        return entry

    @functools.cached_property
    def _by_uid(self) -> dict[str, PackedInstance]:
        return {entry.sop_instance_uid: entry for entry in self.instances}

    def to_bytes(self) -> bytes:
        document = {
            "format": MANIFEST_FORMAT,
            "version": VERSION,
            "pack_id": self.pack_id,
            "created": self.created,
            "study_uid": self.study_uid,
            "compression": {"algorithm": COMPRESSION, "level": self.compression_level},
            "header_sha256": self.header_sha256,
            "encryption": self.encryption.as_json() if self.encryption else None,
            "instances": [entry.as_json() for entry in self.instances],
        }
        # Compact: indenting would take the pure-Python encoder, several
        # times slower; python3 -m json.tool shows it indented.
        text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
        return (text + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse a manifest; ValueError says what is wrong with it."""
        document = _load(data, "the manifest")
        _check_format(document, MANIFEST_FORMAT)
        try:
            return cls(
                pack_id=_text(document, "pack_id"),
                created=_text(document, "created"),
                study_uid=document["study_uid"],
                compression_level=_number(document["compression"], "level"),
                header_sha256=_text(document, "header_sha256"),
                encryption=Encryption.from_json(document["encryption"]),
                instances=tuple(
                    PackedInstance.from_json(item) for item in document["instances"]
                ),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"the manifest lacks or mistypes {exc}") from None


@dataclass(frozen=True)
class Trailer:
    """The clear last member: where the manifest is, for a reader that seeks.

    Always exactly 512 bytes (JSON padded with spaces, ending in a newline),
    so that a reader finds it just before the NULs that end the pack.
    """

    manifest_header_offset: int
    manifest_data_offset: int
    manifest_member_size: int
    manifest_sha256: str
    instance_count: int

    def to_bytes(self) -> bytes:
        document = {
            "format": TRAILER_FORMAT,
            "version": VERSION,
            "manifest_header_offset": self.manifest_header_offset,
            "manifest_data_offset": self.manifest_data_offset,
            "manifest_member_size": self.manifest_member_size,
            "manifest_sha256": self.manifest_sha256,
            "instance_count": self.instance_count,
        }
        text = _canonical(document).rstrip(b"\n")
        return text.ljust(TRAILER_SIZE - 1) + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> Trailer:
        """Parse a trailer; ValueError says what is wrong with it."""
        document = _load(data, "the trailer")
        _check_format(document, TRAILER_FORMAT)
        try:
            trailer = cls(
                manifest_header_offset=_number(document, "manifest_header_offset"),
                manifest_data_offset=_number(document, "manifest_data_offset"),
                manifest_member_size=_number(document, "manifest_member_size"),
                manifest_sha256=_text(document, "manifest_sha256"),
                instance_count=_number(document, "instance_count"),
            )
        except KeyError as exc:
            raise ValueError(f"the trailer lacks {exc}") from None
        if trailer.to_bytes() != data:
            raise ValueError("the trailer is not in its canonical form")
        return trailer


def _canonical(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, sort_keys=True, separators=(",", ":")) + "\n").encode()


def _check_of(document: dict[str, Any]) -> str:
    """16 hex digits of the SHA-256 of ``document``'s canonical JSON."""
    return hashlib.sha256(_canonical(document)).hexdigest()[:16]


def _load(data: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{what} is not a JSON object")
    return document


def _check_format(document: dict[str, Any], expected: str) -> None:
    if document.get("format") != expected:
        raise ValueError(f"format is {document.get('format')!r}, not {expected!r}")
    version = document.get("version")
    if version != VERSION:
        raise VersionError(
            f"format version {version!r}; this appliance reads version {VERSION}"
        )


def _text(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise ValueError(f"{key} must be text, not {type(value).__name__}")
    return value


def _number(data: dict[str, Any], key: str) -> int:
    value = data[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key} must be a whole number, not {value!r}")
    return value
