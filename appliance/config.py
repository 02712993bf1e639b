"""The appliance's configuration: one TOML file, every key with a default.

The schema below is the single description of every key: its type, default,
unit and what is allowed. Loading, ``appliance config check``, the example
file (``appliance config example``) and docs/configuration.md all follow it.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apscheduler.triggers.cron import CronTrigger

from appliance.errors import ConfigError
from appliance.hsm import policy
from appliance.prefetch import selection
from appliance.replication.bandwidth import check_timetable
from appliance.toml_text import shown
from appliance.web.accounts import ACCOUNT_KEYS, check_accounts

logger = logging.getLogger(__name__)

DUPLICATE_POLICIES = ("refuse", "keep_first", "replace")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
VOLUME_KINDS = ("directory", "tape", "optical")
MIRROR_KINDS = ("directory", "sftp")
MIRROR_CLIENTS = ("openssh", "paramiko")
AUDIT_TRANSPORTS = ("off", "udp", "tls")
AUDIT_FACILITIES = ("authpriv", "auth", "audit", *(f"local{n}" for n in range(8)))

Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class Key:
    """One configuration key: where it lives, its default and its rule."""

    section: str
    name: str
    default: Any
    help: str
    check: Callable[[Any], str | None] = lambda value: None

    @property
    def path(self) -> str:
        return f"{self.section}.{self.name}"


def _ae_title(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    stripped = value.strip()
    # Spaces around a title are padding: one of spaces alone names nothing.
    if value and not stripped:
        return "must not be all spaces"
    if not 1 <= len(stripped) <= 16:
        return "must be 1 to 16 characters"
    if not stripped.isascii() or "\\" in stripped:
        return "must be ASCII without backslash"
    if any(ord(c) < 0x20 for c in stripped):
        return "must not contain control characters"
    return None


def _integer(low: int, high: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer from {low} to {high}"
        if not low <= value <= high:
            return f"must be an integer from {low} to {high}"
        return None

    return check


def _seconds(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "must be a number of seconds greater than 0"
    if not math.isfinite(value) or value <= 0:
        return "must be a number of seconds greater than 0"
    return None


def _at_least_seconds(low: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if _seconds(value) or value < low:
            return f"must be a number of seconds, at least {low:g}"
        return None

    return check


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value not in choices:
            return "must be one of " + ", ".join(repr(c) for c in choices)
        return None

    return check


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) else "must be a string"


def _path(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "must be a path (a non-empty string)"
    return None


def _ip_address(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be an IPv4 or IPv6 address"
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "must be an IPv4 or IPv6 address, e.g. 127.0.0.1 or 0.0.0.0"
    return None


def _fingerprint(value: Any) -> str | None:
    """A SHA-256 fingerprint: 64 hex digits, colons allowed; or "" for none."""
    if not isinstance(value, str):
        return "must be a string"
    digits = value.replace(":", "")
    if value and not re.fullmatch(r"[0-9A-Fa-f]{64}", digits):
        return "must be a SHA-256 fingerprint: 64 hex digits, colons allowed"
    return None


def _ae_title_list(value: Any) -> str | None:
    if not isinstance(value, list):
        return "must be a list of AE titles"
    for item in value:
        problem = _ae_title(item)
        if problem:
            return f"entry {shown(item)} {problem}"
    return None


def _record_size(value: Any) -> str | None:
    usage = "must be a multiple of 512 from 4096 to 16777216"
    if isinstance(value, bool) or not isinstance(value, int):
        return usage
    return None if 4096 <= value <= 16 * 2**20 and value % 512 == 0 else usage


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _number(low: float, high: float) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a number from {low:g} to {high:g}"
        if not math.isfinite(value) or not low <= value <= high:
            return f"must be a number from {low:g} to {high:g}"
        return None

    return check


def _crontab(value: Any) -> str | None:
    usage = 'must be a crontab line "minute hour day month weekday"'
    if not isinstance(value, str):
        return usage + ', e.g. "0 1 * * *"'
    fields = value.split()
    # APScheduler counts weekdays from Monday = 0, cron from Sunday = 0: a
    # number would silently run on another day than the administrator meant.
    if len(fields) == 5 and any(c.isdigit() for c in fields[4]):
        return "must name weekdays (sun, mon-fri), not number them"
    try:
        CronTrigger.from_crontab(value, timezone="UTC")
    except ValueError as exc:
        return f"{usage}: {exc}"
    return None


def _crontab_or_off(value: Any) -> str | None:
    """A crontab line, or "" for never."""
    return None if value == "" else _crontab(value)


def _rule_name(value: Any) -> str | None:
    if not isinstance(value, str) or not RULE_NAME.fullmatch(value):
        return "must be 1 to 64 letters, digits, '-', '_' or '.'"
    return None


def _modality_list(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return 'must be a non-empty list of modalities, e.g. ["CT", "MR"]'
    for item in value:
        if not isinstance(item, str) or not MODALITY.fullmatch(item):
            return f'entry {shown(item)} must be a modality code in capitals, e.g. "CT"'
    return None


def _nonempty_ae_title_list(value: Any) -> str | None:
    if isinstance(value, list) and not value:
        return "must name at least one AE title"
    return _ae_title_list(value)


RULE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
MODALITY = re.compile(r"[A-Z0-9_]{1,16}")

# tier, default high and low watermarks in percent
TIER_MARKS = (("online", 85, 75), ("nearline", 90, 80))


def _tier_keys(tier: str, high: int, low: int) -> tuple[Key, ...]:
    return (
        Key(
            tier,
            "capacity_bytes",
            0,
            f"Size of the {tier} tier, in bytes, that watermarks are measured "
            "against; 0 means the size of its file system without the blocks "
            "reserved for root (used + available, as df counts Use%).",
            _integer(0, 2**60),
        ),
        Key(
            tier,
            "high_watermark",
            high,
            f"Percent of capacity_bytes above which studies are released from "
            f"the {tier} tier, least recently used first.",
            _number(1, 100),
        ),
        Key(
            tier,
            "low_watermark",
            low,
            "Percent of capacity_bytes that those releases bring usage down to; "
            "below high_watermark.",
            _number(0, 100),
        ),
    )


KEYS: tuple[Key, ...] = (
    Key("node", "ae_title", "APPLIANCE", "The appliance's own AE title.", _ae_title),
    Key(
        "node",
        "bind_address",
        "127.0.0.1",
        "Address the DICOM listener binds to; 0.0.0.0 for every IPv4 address.",
        _ip_address,
    ),
    Key("node", "port", 11112, "DICOM listener TCP port.", _integer(1, 65535)),
    Key(
        "node",
        "check_called_ae_title",
        True,
        "Reject associations addressed to another AE title than node.ae_title "
        "(a sender configured for another archive).",
        lambda v: None if isinstance(v, bool) else "must be true or false",
    ),
    Key(
        "node",
        "max_associations",
        32,
        "Associations served at once, over all workers; more are rejected "
        "with 'local limit exceeded'.",
        _integer(1, 1000),
    ),
    Key(
        "node",
        "workers",
        0,
        "Worker processes serving associations; 0 means one per CPU core.",
        _integer(0, 64),
    ),
    Key(
        "node",
        "max_pdu_size",
        262144,
        "Largest PDU the appliance receives, in bytes; 0 means no limit.",
        _integer(0, 2**31 - 1),
    ),
    Key(
        "timeouts",
        "association",
        30.0,
        "Seconds to wait for a TLS handshake, association request, accept or release.",
        _seconds,
    ),
    Key(
        "timeouts",
        "dimse",
        60.0,
        "Seconds to wait for the next DIMSE message of an operation.",
        _seconds,
    ),
    Key(
        "timeouts",
        "network",
        120.0,
        "Seconds an association may stay silent before it is closed.",
        _seconds,
    ),
    Key(
        "timeouts",
        "connect",
        10.0,
        "Seconds to wait for a TCP connection to a peer (C-MOVE).",
        _seconds,
    ),
    Key(
        "storage",
        "data_dir",
        "appliance-data",
        "Directory holding everything by default; relative to the directory "
        "the appliance starts in.",
        _path,
    ),
    Key(
        "storage",
        "online_path",
        "",
        "Online tier directory; empty means DATA_DIR/online. A folder named "
        "here must exist (a mount point): it is never made.",
        _text,
    ),
    Key(
        "storage",
        "nearline_path",
        "",
        "Nearline tier directory (study packs); empty means DATA_DIR/nearline. "
        "A folder named here must exist (a mount point): it is never made.",
        _text,
    ),
    Key(
        "storage",
        "catalog_path",
        "",
        "Catalog (LMDB) directory; empty means DATA_DIR/catalog. A folder "
        "named here must exist (a mount point): it is never made.",
        _text,
    ),
    Key(
        "storage",
        "catalog_max_size",
        64 * 2**30,
        "Largest size the catalog may grow to, in bytes (sparse file).",
        _integer(2**20, 2**44),
    ),
    Key(
        "storage",
        "reserved_bytes",
        64 * 2**20,
        "Free space, in bytes, that storing never uses on the online tier; "
        "stores that would eat into it are refused with 0xA700.",
        _integer(0, 2**50),
    ),
    Key(
        "storage",
        "duplicate_policy",
        "refuse",
        "What to do when a SOP Instance UID arrives again with different "
        "bytes: refuse (0x0111), keep_first (answer success, keep the stored "
        "copy) or replace (store the new bytes).",
        _one_of(DUPLICATE_POLICIES),
    ),
    *(key for tier, high, low in TIER_MARKS for key in _tier_keys(tier, high, low)),
    Key(
        "migration",
        "enabled",
        True,
        "Run the migration rules on migration.schedule and release studies "
        "when a tier passes its high watermark; false stops both.",
        _boolean,
    ),
    Key(
        "migration",
        "schedule",
        "0 1 * * *",
        "When the rules run, as a crontab line (minute hour day month "
        "weekday) in local time; weekdays by name (mon-fri). Default: 01:00 "
        "every night.",
        _crontab,
    ),
    Key(
        "migration",
        "watermark_interval",
        30.0,
        "Seconds between checks of the online and nearline tiers against their "
        "high watermarks (a cheap check; releases run only when one is crossed).",
        _at_least_seconds(1.0),
    ),
    Key(
        "migration",
        "min_copies",
        2,
        "Verified copies that must remain on other tiers before a study's "
        "copy on a tier is released. The last verified copy is never released.",
        _integer(1, 9),
    ),
    Key(
        "migration",
        "rate_mb_per_s",
        50.0,
        "Most megabytes (1,000,000 bytes) per second that migration reads; 0 "
        "means no limit.",
        _number(0, 100_000),
    ),
    Key(
        "access",
        "restrict_storage",
        False,
        "Only peers named in access.storage may store.",
        lambda v: None if isinstance(v, bool) else "must be true or false",
    ),
    Key(
        "access",
        "storage",
        [],
        "AE titles of [[peers]] allowed to store (checked with the peer's host).",
        _ae_title_list,
    ),
    Key(
        "access",
        "restrict_query",
        False,
        "Only peers named in access.query may query and retrieve.",
        lambda v: None if isinstance(v, bool) else "must be true or false",
    ),
    Key(
        "access",
        "query",
        [],
        "AE titles of [[peers]] allowed to query and retrieve.",
        _ae_title_list,
    ),
    Key(
        "commitment",
        "require_offsite",
        False,
        "Storage commitment reports an instance committed only once its copy "
        "on the off-site mirror is verified, too (not only its online copy).",
        _boolean,
    ),
    Key(
        "commitment",
        "timeout",
        3600.0,
        "Seconds a commitment request waits for off-site copies (with "
        "require_offsite); then instances still without one are reported failed.",
        _seconds,
    ),
    Key(
        "commitment",
        "retry_initial",
        10.0,
        "Seconds before a report that could not be delivered is tried again; "
        "the wait doubles after every failed attempt.",
        _seconds,
    ),
    Key(
        "commitment",
        "retry_max",
        600.0,
        "Longest wait, in seconds, between two attempts to deliver a report.",
        _seconds,
    ),
    Key(
        "commitment",
        "max_references",
        50000,
        "Most instances one storage commitment request may name; a longer "
        "request is refused with 0x0213 (resource limitation) before it is "
        "decoded, so that it cannot hold a worker for minutes.",
        _integer(1, 1_000_000),
    ),
    Key(
        "commitment",
        "retention_days",
        30,
        "Days a commitment transaction is remembered (a repeated request is "
        "answered with the same result) and an undelivered report is retried.",
        _integer(1, 3650),
    ),
    Key(
        "tls",
        "enabled",
        False,
        "Serve DICOM over TLS on tls.port as well as plain DICOM on node.port "
        "(BCP 195: TLS 1.2 or 1.3; docs/tls.md).",
        _boolean,
    ),
    Key("tls", "port", 2762, "DICOM over TLS listener TCP port.", _integer(1, 65535)),
    Key(
        "tls",
        "certificate",
        "",
        "PEM file with the appliance's certificate (then any intermediate "
        "certificates); needed by tls.enabled, hl7.tls and peers with tls = true.",
        _text,
    ),
    Key(
        "tls",
        "key",
        "",
        "PEM file with the certificate's private key, unencrypted; readable by "
        "the appliance's user only.",
        _text,
    ),
    Key(
        "tls",
        "ca_file",
        "",
        "PEM file with the CA certificates that peers' certificates are "
        "verified against: clients when verify_clients is on or their AE title "
        "is bound to a certificate, and peers the appliance connects to.",
        _text,
    ),
    Key(
        "tls",
        "verify_clients",
        False,
        "Refuse TLS clients without a certificate signed by a CA in tls.ca_file.",
        _boolean,
    ),
    Key(
        "volumes",
        "kind",
        "directory",
        "The offline tier's volume library: directory (a folder per volume; "
        "also LTFS-mounted tapes), tape (a drive through mt, a changer "
        "through mtx) or optical (ISO 9660 images written with xorriso).",
        _one_of(VOLUME_KINDS),
    ),
    Key(
        "volumes",
        "path",
        "",
        "Folder of a directory or optical library, which must exist (a mount "
        "point, or a folder on a mounted disk): a missing one is refused, never "
        "made; empty means DATA_DIR/volumes, made on first use.",
        _text,
    ),
    Key(
        "volumes",
        "device",
        "/dev/nst0",
        "Tape drive, a non-rewinding device (tape only).",
        _path,
    ),
    Key(
        "volumes",
        "changer",
        "",
        "The changer's SCSI generic device, e.g. /dev/sg3; empty for a single "
        "drive without changer (tape only).",
        _text,
    ),
    Key("volumes", "drive", 0, "The drive's number in the changer.", _integer(0, 63)),
    Key(
        "volumes",
        "state_path",
        "",
        "Where a tape library keeps its list of volumes; empty means "
        "DATA_DIR/volume-state.",
        _text,
    ),
    Key(
        "volumes",
        "record_size",
        262144,
        "Bytes per tape record, a multiple of 512 (tape only).",
        _record_size,
    ),
    Key(
        "volumes",
        "command_timeout",
        900.0,
        "Seconds an mt, mtx or xorriso command may take.",
        _seconds,
    ),
    Key(
        "volumes",
        "load_timeout",
        300.0,
        "Seconds to wait for a changer to load a volume.",
        _seconds,
    ),
    Key(
        "volumes",
        "simulated_path",
        "",
        "Non-empty: a simulated tape drive and changer kept in this folder, "
        "for rehearsals without hardware (tape only).",
        _text,
    ),
    Key("volumes", "xorriso", "xorriso", "The xorriso program (optical only).", _path),
    Key(
        "mirror",
        "kind",
        "directory",
        "The off-site mirror: directory (a local or mounted folder: NFS, a USB "
        "disk for rotation) or sftp (an SSH server, key authentication).",
        _one_of(MIRROR_KINDS),
    ),
    Key(
        "mirror",
        "path",
        "",
        "directory: the mirror folder, which must exist (a mount point); empty "
        "means DATA_DIR/mirror, made on first use.",
        _text,
    ),
    Key(
        "mirror",
        "client",
        "openssh",
        "sftp: the SSH client: openssh (the ssh program, from openssh-client; "
        "fastest) or paramiko (in-process, needs no other program).",
        _one_of(MIRROR_CLIENTS),
    ),
    Key("mirror", "host", "", "sftp: the mirror's host name or address.", _text),
    Key("mirror", "port", 22, "sftp: the mirror's SSH port.", _integer(1, 65535)),
    Key("mirror", "user", "", "sftp: the user to log in as.", _text),
    Key(
        "mirror",
        "key_file",
        "",
        "sftp: the private key file (ed25519 or RSA) that logs in.",
        _text,
    ),
    Key(
        "mirror",
        "known_hosts",
        "",
        "sftp: a known_hosts file holding the mirror's host key; an unknown or "
        "changed key stops replication (it is never accepted on its own).",
        _text,
    ),
    Key(
        "mirror",
        "remote_path",
        ".",
        "sftp: the mirror's folder, from the login folder.",
        _text,
    ),
    Key(
        "mirror",
        "timeout",
        30.0,
        "sftp: seconds to connect, log in, and for each read or write.",
        _seconds,
    ),
    Key(
        "mirror",
        "stall_timeout",
        120.0,
        "Seconds an upload may make no progress before it is cut off and resumed.",
        _seconds,
    ),
    Key(
        "mirror",
        "keepalive",
        15.0,
        "sftp: seconds between SSH keepalives.",
        _seconds,
    ),
    Key(
        "mirror",
        "retries",
        5,
        "sftp: reconnections per operation before it fails.",
        _integer(0, 100),
    ),
    Key(
        "mirror",
        "backoff",
        1.0,
        "sftp: seconds before the first reconnection; doubled each time.",
        _seconds,
    ),
    Key(
        "mirror",
        "backoff_max",
        60.0,
        "sftp: the longest wait between reconnections, in seconds.",
        _seconds,
    ),
    Key(
        "mirror",
        "block_size",
        1048576,
        "Bytes per write to the mirror (and per bandwidth step).",
        _integer(32 * 1024, 16 * 2**20),
    ),
    Key(
        "replication",
        "enabled",
        True,
        "Send every stored instance to the mirror; false keeps them queued.",
        _boolean,
    ),
    Key(
        "replication",
        "timetable",
        "off",
        'Bandwidth by time of day: "07:00,2MB 19:00,40MB" (from 07:00 2 MB/s, '
        'from 19:00 40 MB/s), weekdays with "mon-fri ...; sat-sun off", off for '
        "no limit, pause to send nothing. See docs/replication.md.",
        check_timetable,
    ),
    Key(
        "replication",
        "batch_bytes",
        64_000_000,
        "Bytes of waiting instances that make a pack for the mirror at once.",
        _integer(1_000_000, 10**12),
    ),
    Key(
        "replication",
        "batch_seconds",
        30.0,
        "Seconds the oldest waiting instance waits at most before a smaller pack goes.",
        _seconds,
    ),
    Key(
        "replication",
        "snapshot_interval",
        86400.0,
        "Seconds between encrypted catalog snapshots on the mirror (the "
        "journal of changes follows every pack).",
        _seconds,
    ),
    Key(
        "replication",
        "verify_after_upload",
        True,
        "Read every pack back from the mirror and check it before its "
        "instances count as replicated.",
        _boolean,
    ),
    Key(
        "replication",
        "audit_days",
        90,
        "Days in which the rolling audit reads the whole mirror back once, an "
        "hourly share at a time; 0 turns it off.",
        _integer(0, 3650),
    ),
    Key(
        "replication",
        "compression_level",
        3,
        "zstd level of the packs sent to the mirror, 1 to 19: 1 takes less "
        "CPU, higher levels make fewer bytes for a slow link.",
        _integer(1, 19),
    ),
    Key(
        "hl7",
        "enabled",
        False,
        "Listen for HL7 v2 scheduling messages (SIU, ORM, OMI) from the RIS "
        "over MLLP; set bind_address to the address the RIS can reach too.",
        lambda v: None if isinstance(v, bool) else "must be true or false",
    ),
    Key(
        "hl7",
        "bind_address",
        "127.0.0.1",
        "Address the HL7 listener binds to; 0.0.0.0 for every IPv4 address.",
        _ip_address,
    ),
    Key("hl7", "port", 2575, "HL7 (MLLP) listener TCP port.", _integer(1, 65535)),
    Key(
        "hl7",
        "tls",
        False,
        "Serve MLLP over TLS on hl7.tls_port as well, with the [tls] "
        "certificate, key, ca_file and verify_clients.",
        _boolean,
    ),
    Key(
        "hl7",
        "tls_port",
        2576,
        "HL7 (MLLP over TLS) listener TCP port.",
        _integer(1, 65535),
    ),
    Key(
        "hl7",
        "max_message_bytes",
        1048576,
        "Longest message taken; a longer one is answered AR and dropped.",
        _integer(1024, 64 * 1024 * 1024),
    ),
    Key(
        "hl7",
        "idle_timeout",
        300.0,
        "Seconds a connection may stay silent before it is closed.",
        _at_least_seconds(1.0),
    ),
    Key(
        "hl7",
        "ack_days",
        30.0,
        "Days the ACK sent for an applied message is kept, so that the same "
        "message sent again gets the same answer and is not applied twice; "
        "older ones are deleted once a day.",
        _number(1.0, 3650.0),
    ),
    Key(
        "hl7",
        "max_connections",
        64,
        "Connections served at once; more are closed at once.",
        _integer(1, 10000),
    ),
    Key(
        "web",
        "enabled",
        True,
        "Serve HTTP: DICOMweb (docs/web.md) and a health check.",
        _boolean,
    ),
    Key(
        "web",
        "bind_address",
        "127.0.0.1",
        "Address the HTTP server binds to; 0.0.0.0 for every IPv4 address.",
        _ip_address,
    ),
    Key("web", "port", 8080, "HTTP server TCP port.", _integer(1, 65535)),
    Key(
        "web",
        "tls_certificate",
        "",
        "PEM certificate chain for HTTPS; empty serves plain HTTP.",
        _text,
    ),
    Key(
        "web",
        "tls_key",
        "",
        "PEM private key of tls_certificate (empty: it is in that file).",
        _text,
    ),
    Key(
        "web",
        "accounts",
        [],
        "Who may call the HTTP server: [[web.accounts]] tables (below); "
        "with none, everything but /health is refused.",
        check_accounts,
    ),
    Key(
        "web",
        "max_stow_bytes",
        4 * 2**30,
        "Largest STOW-RS request body, in bytes; a larger one is answered 413 "
        "before it is read, and nothing of it is stored.",
        _integer(4096, 2**44),
    ),
    Key(
        "web",
        "qido_max_results",
        10000,
        "Most results one QIDO-RS search answers; when more match, the answer "
        "says so in a Warning header, and offset asks for the rest.",
        _integer(1, 10_000_000),
    ),
    Key(
        "web",
        "header_timeout",
        30.0,
        "Seconds a connection has to send a request's line and headers, from "
        "its start or from the end of the previous answer on it; then it is "
        "closed, with a WARNING naming the address (at most one a minute per "
        "address, then the number of the others). The body is not timed by it.",
        _at_least_seconds(1.0),
    ),
    Key(
        "web",
        "stow_stall_timeout",
        60.0,
        "Seconds a STOW-RS request body may go without a byte arriving; then it "
        "is answered 408, what arrived is removed, and nothing is stored.",
        _seconds,
    ),
    Key(
        "web",
        "login_failures",
        5,
        "Failed logins of one user name from one address, within login_window, "
        "that lock that pair out (429 with Retry-After).",
        _integer(1, 1000),
    ),
    Key(
        "web",
        "login_address_failures",
        20,
        "Failed logins from one address, whatever the user names, within "
        "login_window, that lock that address out.",
        _integer(1, 100000),
    ),
    Key(
        "web",
        "login_window",
        300.0,
        "Seconds over which failed logins are counted.",
        _at_least_seconds(1.0),
    ),
    Key(
        "web",
        "login_lock_max",
        900.0,
        "Longest lock, in seconds: the first lasts a minute (or this, if "
        "shorter), each further one of the same pair or address twice as long.",
        _at_least_seconds(1.0),
    ),
    Key(
        "prefetch",
        "enabled",
        True,
        "Recall the priors of the appointments the RIS sends, so that they "
        "are online in time.",
        lambda v: None if isinstance(v, bool) else "must be true or false",
    ),
    Key(
        "prefetch",
        "interval",
        300.0,
        "Seconds between two runs of the prefetch planner.",
        _at_least_seconds(10.0),
    ),
    Key(
        "prefetch",
        "lead_hours",
        2.0,
        "Priors must be online this many hours before the appointment.",
        _number(0, 24 * 30),
    ),
    Key(
        "prefetch",
        "horizon_days",
        3.0,
        "Plan the appointments starting within this many days.",
        _number(0.01, 365),
    ),
    Key(
        "prefetch",
        "grace_hours",
        24.0,
        "Recalled priors stay pinned online this long after the appointment.",
        _number(0, 24 * 365),
    ),
    Key(
        "prefetch",
        "priors",
        3,
        "How many priors per appointment (unless a [[prior_rules]] table says).",
        _integer(0, 50),
    ),
    Key(
        "prefetch",
        "max_prior_years",
        3.0,
        "How old a prior may be, in years (unless a [[prior_rules]] table says).",
        _number(0.01, 200),
    ),
    Key(
        "prefetch",
        "match",
        "modality",
        "What makes a study a prior: modality, body_part, "
        "modality_and_body_part or any (unless a [[prior_rules]] table says).",
        _one_of(selection.MATCHES),
    ),
    Key(
        "prefetch",
        "watch_folder",
        "",
        "A folder the RIS drops appointment list files (*.csv) into; each is "
        "imported, then moved to done/ or refused/. Empty: none.",
        _text,
    ),
    Key(
        "prefetch",
        "rate_mb_per_s",
        50.0,
        "Recalls for prefetch read at most this many MB/s, so that ingest and "
        "retrieval keep their share.",
        _number(0.1, 100000),
    ),
    Key(
        "restore",
        "timetable",
        "off",
        "Bandwidth a restore reads the mirror with, by time of day, apart from "
        'replication\'s: "07:00,5MB 19:00,100MB", off for no limit, pause to '
        "read nothing (a retrieval of a study not yet restored still goes).",
        check_timetable,
    ),
    Key(
        "restore",
        "cache_gb",
        4.0,
        "Local room, in GB, for packs fetched from the mirror by a restore "
        "or a recall from the mirror.",
        _number(0, 1_000_000),
    ),
    Key(
        "restore",
        "online_days",
        0,
        "A restore brings back online the studies at most this many days old "
        "(by study date); older ones go where older_studies says. 0: every "
        "study comes back online.",
        _integer(0, 36500),
    ),
    Key(
        "restore",
        "older_studies",
        "mirror",
        "Where a restore leaves studies older than online_days: mirror (read "
        "from it when asked for) or nearline (packed onto the nearline tier).",
        _one_of(("mirror", "nearline")),
    ),
    Key(
        "drills",
        "schedule",
        "0 4 1 * *",
        "When the service runs a restore drill (appliance dr drill): a crontab "
        'line in local time, "" for never. See docs/restore.md.',
        _crontab_or_off,
    ),
    Key(
        "drills",
        "studies",
        10,
        "Studies a drill restores from the mirror and checks, picked at random "
        "among those with a verified off-site copy.",
        _integer(1, 100000),
    ),
    Key(
        "scrub",
        "schedule",
        "20 * * * *",
        "When the service runs a share of the scrub (every online file, "
        "nearline pack and pack on a loaded volume read back and checked): a "
        'crontab line, "" for never. See docs/scrub.md.',
        _crontab_or_off,
    ),
    Key(
        "scrub",
        "cycle_days",
        90,
        "Days in which the scheduled runs read every copy once; each run "
        "checks its share. A volume not read for this long is asked for.",
        _integer(1, 3650),
    ),
    Key(
        "scrub",
        "rate_mb_per_s",
        20.0,
        "The scrub reads at most this many MB/s, so that ingest and retrieval "
        "keep their share.",
        _number(0.01, 100000),
    ),
    Key(
        "audit",
        "enabled",
        True,
        "Keep the audit trail: who stored, queried, retrieved, exported, "
        "recalled, released or deleted what, in DICOM audit messages appended "
        "to DATA_DIR/audit/audit.log (docs/audit.md).",
        _boolean,
    ),
    Key(
        "audit",
        "syslog_transport",
        "off",
        "Also send each audit message to a syslog collector (an audit record "
        "repository): off, udp (RFC 5426) or tls (RFC 5425).",
        _one_of(AUDIT_TRANSPORTS),
    ),
    Key(
        "audit",
        "syslog_host",
        "",
        "The collector's host name or address; with tls, its certificate must name it.",
        _text,
    ),
    Key(
        "audit",
        "syslog_port",
        0,
        "The collector's port; 0 for the usual one (514 for udp, 6514 for tls).",
        _integer(0, 65535),
    ),
    Key(
        "audit",
        "ca_file",
        "",
        "tls: the CA certificate(s), PEM, the collector's certificate is "
        "checked against.",
        _text,
    ),
    Key(
        "audit",
        "certificate",
        "",
        "tls: the appliance's client certificate, PEM, for collectors that ask "
        "for one; empty for none.",
        _text,
    ),
    Key(
        "audit",
        "key",
        "",
        "tls: the private key of that certificate, PEM; empty if the "
        "certificate file holds it.",
        _text,
    ),
    Key(
        "audit",
        "source_id",
        "",
        "The AuditSourceID of every message; empty for node.ae_title.",
        _text,
    ),
    Key(
        "audit",
        "facility",
        "authpriv",
        "The syslog facility: authpriv (10, as DICOM asks), auth, audit or "
        "local0 to local7.",
        _one_of(AUDIT_FACILITIES),
    ),
    Key(
        "audit",
        "rotate_bytes",
        64 * 1024 * 1024,
        "Bytes: a record that would take audit.log past this size starts a "
        "new one, the old file renamed audit.log.N (N growing; docs/audit.md); "
        "0 never rotates.",
        _integer(0, 1 << 40),
    ),
    Key(
        "audit",
        "keep_files",
        0,
        "Rotated audit files kept, the newest; older ones are removed (never "
        "one the syslog sender has not sent). 0 keeps all of them, as an "
        "audit trail kept for years needs.",
        _integer(0, 1000000),
    ),
    Key("logging", "level", "INFO", "Log level.", _one_of(LOG_LEVELS)),
    Key(
        "logging",
        "format",
        "text",
        "text for people, json (one object per line) for journald.",
        _one_of(LOG_FORMATS),
    ),
)

PEER_KEYS: dict[str, tuple[Callable[[Any], str | None], str]] = {
    "ae_title": (_ae_title, "The peer's AE title."),
    "host": (_text, "Host name or address the peer connects from and listens on."),
    "port": (
        _integer(1, 65535),
        "The peer's DICOM port (C-MOVE destination, storage commitment reports).",
    ),
}

# Peer keys that may be left out, with their defaults.
PEER_OPTIONAL_KEYS: dict[str, tuple[Check, str, Any]] = {
    "tls": (
        _boolean,
        "Connect to the peer over TLS (port is then its TLS port); its "
        "certificate must be signed by a CA in tls.ca_file and name its host.",
        False,
    ),
    "certificate_cn": (
        _text,
        "Bind the AE title to a certificate: associations from it must come "
        "over TLS with a certificate of this subject common name, and with "
        "tls = true the peer must present it when the appliance connects.",
        "",
    ),
    "certificate_sha256": (
        _fingerprint,
        "The same binding by the certificate's SHA-256 fingerprint (hex, "
        "colons allowed).",
        "",
    ),
}


RULE_KEYS: dict[str, tuple[Check, str]] = {
    "name": (_rule_name, "Shown in logs and dry runs; unique among the rules."),
    "action": (
        _one_of(policy.RULE_ACTIONS),
        "copy (to a tier), move (copy to a tier, verify, then release the "
        "from tier) or release (from a tier).",
    ),
    "from": (
        _one_of(policy.RELEASE_SOURCES),
        "The tier a move or release frees: online or nearline.",
    ),
    "to": (
        _one_of(policy.COPY_TARGETS),
        "The tier a copy or move writes: nearline or offline.",
    ),
    "min_study_age_days": (
        _integer(0, 36500),
        "StudyDate at least this many days ago.",
    ),
    "max_study_age_days": (_integer(0, 36500), "StudyDate at most this many days ago."),
    "min_days_since_received": (
        _integer(0, 36500),
        "Newest instance received at least this many days ago.",
    ),
    "max_days_since_received": (
        _integer(0, 36500),
        "Newest instance received at most this many days ago.",
    ),
    "min_days_since_access": (
        _integer(0, 36500),
        "Last retrieved (or received, if later) at least this many days ago.",
    ),
    "max_days_since_access": (
        _integer(0, 36500),
        "Last retrieved (or received, if later) at most this many days ago.",
    ),
    "min_study_size_mb": (_number(0, 10**9), "Study at least this size, in MB."),
    "max_study_size_mb": (_number(0, 10**9), "Study at most this size, in MB."),
    "modalities": (_modality_list, "The study has one of these modalities."),
    "exclude_modalities": (_modality_list, "The study has none of these modalities."),
    "calling_ae_titles": (
        _nonempty_ae_title_list,
        "One of these AE titles sent instances of the study.",
    ),
    "exclude_calling_ae_titles": (
        _nonempty_ae_title_list,
        "None of these AE titles sent instances of the study.",
    ),
}

# The rules used when the file has no [[rules]]: (why, table). The reasons
# are spelled out in docs/policies.md.
DEFAULT_RULES: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "A second copy on other disks once late images and corrections of "
        "the first day are in.",
        {
            "name": "copy-to-nearline",
            "action": "copy",
            "to": "nearline",
            "min_days_since_received": 1,
        },
    ),
    (
        "Offline volumes are written once: wait a week, until changes to the "
        "study are rare.",
        {
            "name": "copy-to-offline",
            "action": "copy",
            "to": "offline",
            "min_days_since_received": 7,
        },
    ),
    (
        "Free the online tier of studies nobody has opened for three months, "
        "once min_copies other verified copies exist.",
        {
            "name": "release-online-unused",
            "action": "release",
            "from": "online",
            "min_days_since_access": 90,
        },
    ),
)


@dataclass(frozen=True)
class Peer:
    """A known DICOM peer: a C-MOVE destination and a caller the lists name."""

    ae_title: str
    host: str
    port: int
    tls: bool = False
    # Binding of the AE title to a certificate; empty when not bound.
    certificate_cn: str = ""
    certificate_sha256: str = ""

    @property
    def bound_to_certificate(self) -> bool:
        return bool(self.certificate_cn or self.certificate_sha256)


@dataclass(frozen=True)
class Config:
    """The validated configuration, as typed values and resolved paths."""

    values: dict[str, Any]
    peers: tuple[Peer, ...] = ()
    base_dir: Path = field(default_factory=Path.cwd)
    rules: tuple[policy.Rule, ...] = field(default_factory=lambda: default_rules())
    prior_rules: tuple[selection.PriorRule, ...] = ()
    procedures: dict[str, selection.Procedure] = field(default_factory=dict)

    def get(self, path: str) -> Any:
        return self.values[path]

    @property
    def default_prior_rule(self) -> selection.PriorRule:
        """The prefetch defaults, for appointments no [[prior_rules]] names."""
        return selection.PriorRule(
            self.values["prefetch.priors"],
            self.values["prefetch.max_prior_years"],
            self.values["prefetch.match"],
        )

    @property
    def data_dir(self) -> Path:
        return self._resolve(self.values["storage.data_dir"])

    @property
    def online_path(self) -> Path:
        return self._tier_path("storage.online_path", "online")

    @property
    def nearline_path(self) -> Path:
        return self._tier_path("storage.nearline_path", "nearline")

    @property
    def catalog_path(self) -> Path:
        return self._tier_path("storage.catalog_path", "catalog")

    @property
    def restore_folder(self) -> Path:
        """Where a restore keeps its state: pending mark, progress, notes,
        failures, reports."""
        return self.data_dir / "restore"

    @property
    def workers(self) -> int:
        configured = self.values["node.workers"]
        return configured or max(1, os.cpu_count() or 1)

    def peer(self, ae_title: str) -> Peer | None:
        for peer in self.peers:
            if peer.ae_title == ae_title.strip():
                return peer
        return None

    def mirror_settings(self) -> dict[str, Any]:
        """The ``mirror`` keys without the section name, paths resolved."""
        settings = {
            key.name: self.values[key.path] for key in KEYS if key.section == "mirror"
        }
        settings["path"] = str(self._tier_path("mirror.path", "mirror"))
        for name in ("key_file", "known_hosts"):
            if settings[name]:
                settings[name] = str(self._resolve(settings[name]))
        settings.pop("kind")
        return settings

    def volume_settings(self) -> dict[str, Any]:
        """The ``volumes`` keys, without the section name, paths resolved."""
        settings = {
            key.name: self.values[key.path] for key in KEYS if key.section == "volumes"
        }
        settings["path"] = str(self._tier_path("volumes.path", "volumes"))
        settings["state_path"] = str(
            self._tier_path("volumes.state_path", "volume-state")
        )
        if settings["simulated_path"]:
            settings["simulated_path"] = str(self._resolve(settings["simulated_path"]))
        settings.pop("kind")
        return settings

    @property
    def watch_folder(self) -> Path | None:
        """prefetch.watch_folder resolved, or None when there is none."""
        value = self.values["prefetch.watch_folder"]
        return self._resolve(value) if value else None

    def file_path(self, key: str) -> Path:
        """The file a path key names, relative paths resolved."""
        return self._resolve(self.values[key])

    def _tier_path(self, key: str, default_name: str) -> Path:
        value = self.values[key]
        if value:
            return self._resolve(value)
        return self.data_dir / default_name

    def _resolve(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path


def defaults() -> dict[str, Any]:
    """Every key's default, by dotted path."""
    return {key.path: key.default for key in KEYS}


def load(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a configuration file (or only the defaults).

    ``overrides`` (dotted path to value, e.g. from command-line options) win
    over the file. Raises ConfigError listing every problem found.
    """
    document: dict[str, Any] = {}
    if path is not None:
        document = _read_toml(path)

    values, peers, problems = _validate(document)
    rules, rule_problems = _parse_rules(document.get("rules"))
    for dotted, value in (overrides or {}).items():
        # Command-line options get the checks of the keys they stand for.
        problems += _set_value(values, dotted, value)
    problems += rule_problems
    problems += _check_references(values, peers)
    problems += _check_watermarks(values)
    problems += _check_mirror(values)
    problems += _check_commitment(values)
    problems += _check_ports(values)
    problems += _check_audit(values)
    problems += _check_tls(values, peers)
    problems += _check_home_folders(values)
    default = Config(values).default_prior_rule
    prior_rules, prior_problems = selection.parse_rules(
        document.get("prior_rules"), default
    )
    procedures, procedure_problems = selection.parse_procedures(
        document.get("procedures")
    )
    problems += prior_problems + procedure_problems

    if problems:
        raise ConfigError(problems)
    return Config(
        values=values,
        peers=tuple(peers),
        base_dir=Path.cwd(),
        rules=rules,
        prior_rules=prior_rules,
        procedures=procedures,
    )


def _check_ports(values: dict[str, Any]) -> list[tuple[str, str]]:
    """No two listeners share a port."""
    ports = [("node.port", values["node.port"])]
    if values["tls.enabled"]:
        ports.append(("tls.port", values["tls.port"]))
    if values["hl7.enabled"]:
        ports.append(("hl7.port", values["hl7.port"]))
        if values["hl7.tls"]:
            ports.append(("hl7.tls_port", values["hl7.tls_port"]))
    if values["web.enabled"]:
        ports.append(("web.port", values["web.port"]))
    problems = []
    for index, (name, port) in enumerate(ports):
        for other, other_port in ports[:index]:
            if port == other_port:
                problems.append((name, f"must differ from {other} ({port})"))
    return problems


def _check_home_folders(values: dict[str, Any]) -> list[tuple[str, str]]:
    """A path such as ~name/data must name a user of this host; otherwise
    the command that first uses the path would stop with a traceback."""
    problems = []
    for dotted, value in values.items():
        if not isinstance(value, str) or not value.startswith("~"):
            continue
        try:
            Path(value).expanduser()
        except RuntimeError:
            user = value.split("/", 1)[0]
            message = f"{user} is not a user of this host, so it has no home folder"
            problems.append((dotted, f"{message} (got {value!r})"))
    return problems


def _check_audit(values: dict[str, Any]) -> list[tuple[str, str]]:
    """A syslog collector needs its host; over TLS, a CA to check it with."""
    transport = values.get("audit.syslog_transport")
    problems = []
    if transport in ("udp", "tls") and not values.get("audit.syslog_host"):
        problems.append(("audit.syslog_host", f"is required for {transport}"))
    if transport == "tls" and not values.get("audit.ca_file"):
        problems.append(("audit.ca_file", "is required for tls"))
    if values.get("audit.key") and not values.get("audit.certificate"):
        problems.append(("audit.key", "needs audit.certificate"))
    return problems


def _check_tls(values: dict[str, Any], peers: list[Peer]) -> list[tuple[str, str]]:
    """What TLS needs that is missing; the files themselves are checked by
    appliance.tls.file_problems (``appliance config check`` and serve)."""
    problems = []
    users = ["tls.enabled"] if values["tls.enabled"] else []
    users += ["hl7.tls"] if values["hl7.enabled"] and values["hl7.tls"] else []
    users += [f"peer {p.ae_title} (tls = true)" for p in peers if p.tls]
    if users:
        for name in ("tls.certificate", "tls.key"):
            if not values[name]:
                problems.append((name, f"is required by {', '.join(users)}"))
    verifiers = ["tls.verify_clients"] if values["tls.verify_clients"] else []
    verifiers += [f"peer {p.ae_title}" for p in peers if p.tls]
    verifiers += [f"peer {p.ae_title}" for p in peers if p.bound_to_certificate]
    if verifiers and not values["tls.ca_file"]:
        problems.append(("tls.ca_file", f"is required by {', '.join(verifiers)}"))
    for peer in peers:
        if peer.bound_to_certificate and not values["tls.enabled"]:
            message = "binds a certificate, which only tls.enabled can check"
            problems.append((f"peer {peer.ae_title}", message))
    return problems


def _check_mirror(values: dict[str, Any]) -> list[tuple[str, str]]:
    """An SFTP mirror needs its host, user and both key files."""
    if values.get("mirror.kind") != "sftp":
        return []
    return [
        (f"mirror.{name}", "is required when mirror.kind is sftp")
        for name in ("host", "user", "key_file", "known_hosts")
        if not values.get(f"mirror.{name}")
    ]


def mirror_file_problems(config: Config) -> list[tuple[str, str]]:
    """What is wrong with the files the mirror needs, as ``(key, message)``:
    an SFTP mirror's key and known_hosts files, a directory mirror's folder.

    Checked only while replication is enabled (with it off nothing reaches
    the mirror), and for ``appliance config check`` only: a mirror that
    cannot be reached stops replication, never the service. The default
    folder, DATA_DIR/mirror, is made on first use and so is never missing.
    """
    if not config.get("replication.enabled"):
        return []

    kind = config.get("mirror.kind")
    if kind == "sftp":
        return _sftp_file_problems(config)
    if kind == "directory" and config.get("mirror.path"):
        return _mirror_folder_problems(config)
    return []


def _sftp_file_problems(config: Config) -> list[tuple[str, str]]:
    problems = []
    for key in ("mirror.key_file", "mirror.known_hosts"):
        # An empty value is reported by load() already.
        if not config.get(key):
            continue
        problem = _readable_file_problem(config.file_path(key))
        if problem is not None:
            problems.append((key, problem))
    return problems


def _readable_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file, or None. Only opened, never
    read: a private key's bytes have no business in this process."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"

    # Opening a FIFO or a device could block or have effects: look first.
    if not stat.S_ISREG(mode):
        return f"{path} is not a file"

    try:
        path.open("rb").close()
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    return None


def _mirror_folder_problems(config: Config) -> list[tuple[str, str]]:
    # A folder that is named is never made: it is a mount point or a folder
    # on a mounted disk, which must not fill the system disk when unmounted.
    path = config.file_path("mirror.path")
    if not path.exists():
        message = f"{path} does not exist: create it, or mount the mirror disk there"
        return [("mirror.path", message)]
    if not path.is_dir():
        return [("mirror.path", f"{path} is not a folder")]
    return []


def _check_commitment(values: dict[str, Any]) -> list[tuple[str, str]]:
    """Without replication no off-site copy ever comes: every request would
    wait for commitment.timeout and then fail."""
    if values.get("commitment.require_offsite") and not values.get(
        "replication.enabled"
    ):
        return [("commitment.require_offsite", "needs replication.enabled = true")]
    return []


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([("(file)", f"{path} does not exist")]) from None
    except OSError as exc:
        raise ConfigError([("(file)", f"cannot read {path}: {exc}")]) from exc
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        # An editor that saved the file in Latin-1 or UTF-16, say.
        line = data[: exc.start].count(b"\n") + 1
        message = f"{path} is not UTF-8 text (line {line}): save it as UTF-8"
        raise ConfigError([("(file)", message)]) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("(file)", f"{path} is not valid TOML: {exc}")]) from exc


def _validate(
    document: dict[str, Any],
) -> tuple[dict[str, Any], list[Peer], list[tuple[str, str]]]:
    values = defaults()
    problems: list[tuple[str, str]] = []
    sections = {key.section for key in KEYS}

    for section, content in document.items():
        if section in ("peers", "rules", "prior_rules", "procedures"):
            continue
        if section not in sections:
            problems.append((section, "unknown section"))
            continue
        if not isinstance(content, dict):
            problems.append((section, "must be a table ([section])"))
            continue
        for name, value in content.items():
            problems += _set_value(values, f"{section}.{name}", value)

    peers, peer_problems = _parse_peers(document.get("peers", []))
    return values, peers, problems + peer_problems


def _set_value(
    values: dict[str, Any], dotted: str, value: Any
) -> list[tuple[str, str]]:
    key = next((k for k in KEYS if k.path == dotted), None)
    if key is None:
        return [(dotted, "unknown key")]
    # TOML's 30 for a float key's 30.0; not true for 1.0 (a bool is an int).
    if isinstance(key.default, float) and type(value) is int:
        value = float(value)
    problem = key.check(value)
    if problem and key.check is check_accounts:
        # Tables: the problem names the entry; repeating them adds nothing.
        return [(dotted, problem)]
    if problem:
        return [(dotted, f"{problem} (got {shown(value)})")]
    values[dotted] = value
    return []


def _parse_peers(raw: Any) -> tuple[list[Peer], list[tuple[str, str]]]:
    if not isinstance(raw, list):
        return [], [("peers", "must be an array of tables ([[peers]])")]

    peers: list[Peer] = []
    problems: list[tuple[str, str]] = []
    for index, entry in enumerate(raw):
        where = f"peers[{index}]"
        if not isinstance(entry, dict):
            problems.append((where, "must be a table"))
            continue
        entry_problems = _peer_problems(where, entry)
        if entry_problems:
            problems += entry_problems
            continue
        optional = {
            name: entry.get(name, default)
            for name, (_check, _help, default) in PEER_OPTIONAL_KEYS.items()
        }
        peers.append(
            Peer(
                entry["ae_title"].strip(),
                entry["host"],
                int(entry["port"]),
                **optional,
            )
        )

    seen: set[str] = set()
    for peer in peers:
        if peer.ae_title in seen:
            problems.append(("peers", f"AE title {peer.ae_title!r} is listed twice"))
        seen.add(peer.ae_title)
    return peers, problems


def _peer_problems(where: str, entry: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    for name in entry:
        if name not in PEER_KEYS and name not in PEER_OPTIONAL_KEYS:
            problems.append((f"{where}.{name}", "unknown key"))
    for name, (check, _help, _default) in PEER_OPTIONAL_KEYS.items():
        problem = check(entry[name]) if name in entry else None
        if problem:
            problems.append(
                (f"{where}.{name}", f"{problem} (got {shown(entry[name])})")
            )
    for name, (check, _help) in PEER_KEYS.items():
        if name not in entry:
            problems.append((f"{where}.{name}", "is required"))
            continue
        problem = check(entry[name])
        if problem:
            problems.append(
                (f"{where}.{name}", f"{problem} (got {shown(entry[name])})")
            )
    return problems


def _check_references(
    values: dict[str, Any], peers: list[Peer]
) -> list[tuple[str, str]]:
    known = {peer.ae_title for peer in peers}
    problems = []
    for list_key in ("access.storage", "access.query"):
        for title in values[list_key]:
            if title.strip() not in known:
                problems.append(
                    (list_key, f"{title!r} is not the AE title of any [[peers]] entry")
                )
    if values["node.ae_title"].strip() in known:
        problems.append(("node.ae_title", "must differ from every peer's AE title"))
    return problems


def _check_watermarks(values: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    for tier, _high, _low in TIER_MARKS:
        high = values[f"{tier}.high_watermark"]
        low = values[f"{tier}.low_watermark"]
        if low >= high:
            problems.append(
                (
                    f"{tier}.low_watermark",
                    f"must be below {tier}.high_watermark ({high}) (got {shown(low)})",
                )
            )
    return problems


def default_rules() -> tuple[policy.Rule, ...]:
    """The rules that apply when the configuration file has no [[rules]]."""
    rules, problems = _parse_rules([table for _why, table in DEFAULT_RULES])
    assert not problems, problems  # the defaults are tested
    return rules


def _parse_rules(raw: Any) -> tuple[tuple[policy.Rule, ...], list[tuple[str, str]]]:
    if raw is None:
        return default_rules(), []
    if not isinstance(raw, list):
        return (), [("rules", "must be an array of tables ([[rules]])")]

    rules: list[policy.Rule] = []
    problems: list[tuple[str, str]] = []
    first_index: dict[str, int] = {}
    for index, entry in enumerate(raw):
        where = f"rules[{index}]"
        if not isinstance(entry, dict):
            problems.append((where, "must be a table"))
            continue
        entry_problems = _rule_problems(where, entry)
        if entry_problems:
            problems += entry_problems
            continue

        name = entry["name"]
        if name in first_index:
            other = f"rules[{first_index[name]}]"
            problems.append((f"{where}.name", f"{name!r} is also the name of {other}"))
        first_index.setdefault(name, index)
        rules.append(_build_rule(entry))
    return tuple(rules), problems


def _rule_problems(where: str, entry: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    for name, value in entry.items():
        known = RULE_KEYS.get(name)
        if known is None:
            problems.append((f"{where}.{name}", "unknown key"))
            continue
        problem = known[0](value)
        if problem:
            problems.append((f"{where}.{name}", f"{problem} (got {shown(value)})"))
    for name in ("name", "action"):
        if name not in entry:
            problems.append((f"{where}.{name}", "is required"))

    # The checks across keys need every key to be valid on its own first.
    if problems:
        return problems
    return (
        _rule_tier_problems(where, entry)
        + _rule_bound_problems(where, entry)
        + _rule_list_problems(where, entry)
    )


def _rule_tier_problems(where: str, entry: dict[str, Any]) -> list[tuple[str, str]]:
    action = entry["action"]
    needs = dict(zip(("from", "to"), policy.ACTION_TIERS[action], strict=True))
    problems = []
    for key, needed in needs.items():
        if needed and key not in entry:
            problems.append((f"{where}.{key}", f"is required by action {action!r}"))
        if not needed and key in entry:
            problems.append((f"{where}.{key}", f"is not used by action {action!r}"))
    if not problems and entry.get("from") == entry.get("to"):
        problems.append(
            (f"{where}.to", f"must differ from 'from' (both {entry['to']!r})")
        )
    return problems


def _rule_bound_problems(where: str, entry: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    for measure in policy.MEASURES:
        low, high = entry.get(f"min_{measure}"), entry.get(f"max_{measure}")
        if low is not None and high is not None and low > high:
            problems.append(
                (
                    f"{where}.max_{measure}",
                    f"must be at least min_{measure} ({low}) (got {shown(high)})",
                )
            )
    return problems


def _rule_list_problems(where: str, entry: dict[str, Any]) -> list[tuple[str, str]]:
    """A rule whose every wanted value is also excluded can match no study."""
    problems = []
    for attribute in policy.LIST_ATTRIBUTES:
        wanted = entry.get(attribute)
        excluded = entry.get(f"exclude_{attribute}")
        if wanted is None or excluded is None:
            continue
        if {v.strip() for v in wanted} <= {v.strip() for v in excluded}:
            problems.append(
                (
                    f"{where}.exclude_{attribute}",
                    f"excludes every value of {attribute}: the rule can match "
                    f"no study (got {shown(excluded)})",
                )
            )
    return problems


def _build_rule(entry: dict[str, Any]) -> policy.Rule:
    conditions: list[policy.Condition] = []
    for measure in policy.MEASURES:
        low, high = entry.get(f"min_{measure}"), entry.get(f"max_{measure}")
        if low is not None or high is not None:
            conditions.append(policy.Between(measure, low, high))

    for attribute in policy.LIST_ATTRIBUTES:
        for key, exclude in ((attribute, False), (f"exclude_{attribute}", True)):
            if key in entry:
                values = frozenset(value.strip() for value in entry[key])
                conditions.append(policy.AnyOf(attribute, values, exclude))

    return policy.Rule(
        name=entry["name"],
        action=entry["action"],
        source=entry.get("from"),
        target=entry.get("to"),
        conditions=tuple(conditions),
    )


def example() -> str:
    """A complete configuration file with a comment on every key."""
    lines = [
        "# pacs-appliance configuration. Every key is shown with its default;",
        "# delete the ones you do not change. Durations are in seconds, sizes",
        "# in bytes, relative paths start from the directory the appliance",
        "# starts in.",
    ]
    section = None
    for key in KEYS:
        if key.section != section:
            section = key.section
            lines += ["", f"[{section}]"]
        lines += [f"# {line}" for line in _wrap(key.help)]
        lines.append(f"{key.name} = {toml_value(key.default)}")

    lines += _example_rules()
    lines += ["", "# Known DICOM peers: C-MOVE destinations, and the callers that"]
    lines += ["# access.storage and access.query name. Repeat the table per peer."]
    for name, (_check, help_text) in PEER_KEYS.items():
        lines.append(f"# {name}: {help_text}")
    for name, (_check, help_text, default) in PEER_OPTIONAL_KEYS.items():
        text = f"{name}: {help_text} Default: {toml_value(default)}."
        lines += [f"# {line}" for line in _wrap(text)]
    lines += ["# [[peers]]", '# ae_title = "WORKSTATION1"', '# host = "127.0.0.1"']
    lines.append("# port = 11113")
    lines += _example_prefetch_tables()
    lines += _example_accounts()
    return "\n".join(lines) + "\n"


def _example_prefetch_tables() -> list[str]:
    lines = [
        "",
        "# Prefetch: what differs from the [prefetch] defaults for some",
        "# appointments; the first table naming the appointment's modality or",
        "# procedure code applies (docs/prefetch.md).",
    ]
    for name, help_text in selection.RULE_KEYS.items():
        lines.append(f"# {name}: {help_text}")
    lines += [
        "# [[prior_rules]]",
        '# modalities = ["MR"]',
        "# priors = 5",
        '# match = "body_part"',
        "",
        "# The site's procedure codes, for messages that carry only a code.",
    ]
    for name, help_text in selection.PROCEDURE_KEYS.items():
        lines.append(f"# {name}: {help_text}")
    lines += [
        "# [[procedures]]",
        '# code = "CTHEAD"',
        '# modality = "CT"',
        '# body_part = "HEAD"',
    ]
    return lines


def _example_accounts() -> list[str]:
    lines = [
        "",
        "# Web accounts (docs/web.md): delete accounts = [] under [web] and",
        "# repeat the table per account.",
    ]
    for name, help_text in ACCOUNT_KEYS.items():
        lines += [f"# {line}" for line in _wrap(f"{name}: {help_text}")]
    lines += [
        "# [[web.accounts]]",
        '# name = "reading-room"',
        '# role = "viewer"',
        '# password_hash = "scrypt$n=16384,r=8,p=1$..."',
    ]
    return lines


def _example_rules() -> list[str]:
    lines = [
        "",
        "# Migration rules, tried in order for every study at each run of",
        "# migration.schedule; every matching rule applies (docs/policies.md).",
        "# The rules below are the defaults. A file with any [[rules]] table",
        "# replaces all of them; rules = [] before the first [section] turns",
        "# them off. A rule has a name, an action and any of these conditions:",
    ]
    for name, (_check, help_text) in RULE_KEYS.items():
        lines += [f"# {line}" for line in _wrap(f"{name}: {help_text}")]

    for why, table in DEFAULT_RULES:
        lines += ["", *(f"# {line}" for line in _wrap(why)), "[[rules]]"]
        lines += [f"{name} = {toml_value(value)}" for name, value in table.items()]
    return lines


def _wrap(text: str, width: int = 76) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return [*lines, current] if current else lines


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        pairs = (f"{name} = {toml_value(v)}" for name, v in value.items())
        return "{" + ", ".join(pairs) + "}"
    return repr(value)
