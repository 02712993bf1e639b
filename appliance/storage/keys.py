"""The appliance's master keys, and the per-pack data keys they wrap.

Every encrypted pack has its own random 256-bit data key. The data key is
stored in the pack, wrapped (encrypted) under one of the appliance's master
keys, so that the pack can be read on any machine that holds that master
key and on no other. Master keys never leave the appliance except in the
operator's escrow copy.

The key store is one file, ``<data_dir>/keys/master.keys`` (mode 0600, in a
folder of mode 0700), rewritten whole and durably on every change::

    {
      "format": "pacs-appliance-master-keys",
      "version": 1,
      "current": "3f9a0c12",
      "keys": [
        {"id": "3f9a0c12", "created": "2026-01-15T10:15:00Z",
         "key": "<64 hex digits: the 32-byte key>"}
      ]
    }

``current`` is the key new packs are wrapped under; rotating adds a new
current key and keeps the older ones so that older packs stay readable.

A key id is derived from the key, so that a key typed back from paper is
checked against its id::

    id = hex(SHA-256(b"pacs-appliance master key id" || 0x00 || key)[:4])

A wrapped data key is 60 bytes, AES-256-GCM under the master key::

    +----------------+------------------------------+----------------+
    | nonce 12 bytes | data key, encrypted 32 bytes | GCM tag 16     |
    +----------------+------------------------------+----------------+
    associated data: b"pacs-appliance data key" || 0x00 || ASCII key id

The escrow form (:meth:`KeyStore.export_escrow`) is clear text, one key per
line, meant to be printed or kept on offline media::

    pacs-appliance master keys, escrow form 1
    # id     created              role     key
    3f9a0c12 2026-01-15T10:15:00Z current  0f1e2d3c 4b5a6978 ... (8 groups)

Lines starting with ``#`` are comments. Anyone holding this text can read
every encrypted pack the appliance wrote: it is as secret as the key store.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.errors import KeyStoreError, MissingKeyError, StorageError
from appliance.storage import durable

logger = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
WRAPPED_KEY_BYTES = NONCE_BYTES + KEY_BYTES + TAG_BYTES
STORE_FORMAT = "pacs-appliance-master-keys"
STORE_VERSION = 1
ESCROW_TITLE = "pacs-appliance master keys, escrow form 1"

_ID_DOMAIN = b"pacs-appliance master key id\x00"
_WRAP_DOMAIN = b"pacs-appliance data key\x00"
_ID_HEX_DIGITS = 8


class DamagedKeyStore(KeyStoreError):
    """The store's file is there but cannot be read as a key store."""


def key_store_path(data_dir: Path) -> Path:
    """Where the appliance under ``data_dir`` keeps its master keys."""
    return data_dir / "keys" / "master.keys"


def key_id_of(secret: bytes) -> str:
    """The id of a master key: 8 hex digits of a domain-separated SHA-256."""
    digest = hashlib.sha256(_ID_DOMAIN + secret).hexdigest()
    return digest[:_ID_HEX_DIGITS]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class MasterKey:
    """A 256-bit master key, its id and when it was made (UTC, ISO 8601)."""

    key_id: str
    secret: bytes = field(repr=False)
    created: str

    @classmethod
    def generate(cls) -> MasterKey:
        """A fresh random master key."""
        secret = secrets.token_bytes(KEY_BYTES)
        return cls(key_id_of(secret), secret, _now())

    @classmethod
    def from_hex(cls, key_id: str, hex_key: str, created: str) -> MasterKey:
        """A key read back from text; its id must match the key."""
        try:
            secret = bytes.fromhex(hex_key)
        except ValueError:
            raise KeyStoreError(f"master key {key_id}: not hex digits") from None
        if len(secret) != KEY_BYTES:
            raise KeyStoreError(
                f"master key {key_id}: {len(secret)} bytes, expected {KEY_BYTES}"
            )
        if key_id_of(secret) != key_id:
            raise KeyStoreError(
                f"master key {key_id}: the key does not match its id "
                "(damaged or mistyped)"
            )
        return cls(key_id, secret, created)


@dataclass(frozen=True)
class DataKey:
    """A pack's data key: the clear key, and its form wrapped by a master key."""

    secret: bytes = field(repr=False)
    master_key_id: str
    wrapped: bytes = field(repr=False)


class KeyStore:
    """The master keys of one appliance, one of them current.

    Use :meth:`create_if_missing` or :meth:`load`; changes (:meth:`rotate`,
    :func:`import_escrow`) are written to the file before they return.
    """

    def __init__(self, path: Path, keys: dict[str, MasterKey], current_id: str) -> None:
        if current_id not in keys:
            raise KeyStoreError(f"{path}: the current key {current_id} is not listed")
        self.path = path
        self.keys = dict(keys)
        self.current_id = current_id
        try:
            self._seen = path.stat().st_mtime_ns
        except OSError:
            self._seen = 0

    @classmethod
    def create_if_missing(cls, path: Path, announce: bool = True) -> KeyStore:
        """Load the store at ``path``, making one with a fresh key if absent.

        A key made is logged as a warning, to be escrowed; without
        ``announce`` (the caller tells the operator itself) as information.
        """
        with _locked(path):
            if path.exists():
                return cls.load(path)
            key = MasterKey.generate()
            store = cls(path, {key.key_id: key}, key.key_id)
            store._save()
        # Without an escrow copy, every pack is lost with this machine.
        logger.log(
            logging.WARNING if announce else logging.INFO,
            "master key %s created in %s: export it now to the key escrow "
            "(appliance keys export), away from the appliance and its volumes",
            key.key_id,
            path,
        )
        return store

    @classmethod
    def load(cls, path: Path) -> KeyStore:
        """Read the store at ``path``; refuses a file others may read, in a
        folder others may write."""
        try:
            _refuse_open_folder(path.parent)
            mode = path.stat().st_mode
            if not stat.S_ISREG(mode):
                raise KeyStoreError(f"{path} is not a file (a folder?)")
            if mode & 0o077:
                raise KeyStoreError(
                    f"{path} is open to other users (mode "
                    f"{stat.S_IMODE(mode):04o}); run chmod 600 on it"
                )
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise KeyStoreError(f"no key store at {path}") from None
        except OSError as exc:
            raise KeyStoreError(f"cannot read {path}: {exc.strerror}") from exc
        return cls._from_json(path, text)

    @property
    def current(self) -> MasterKey:
        """The key new data keys are wrapped under."""
        self._follow_file()
        return self.keys[self.current_id]

    def get(self, key_id: str) -> MasterKey:
        """The master key with id ``key_id``; MissingKeyError if not held."""
        if key_id not in self.keys:
            self._follow_file()
        key = self.keys.get(key_id)
        if key is None:
            raise MissingKeyError(key_id)
        return key

    def _follow_file(self) -> None:
        """Take in what another process wrote (``appliance keys rotate`` or
        ``import`` while the service runs): new keys, a new current key."""
        try:
            changed = self.path.stat().st_mtime_ns
        except OSError:
            return
        if changed == self._seen:
            return
        on_disk = KeyStore.load(self.path)
        self.keys.update(on_disk.keys)
        self.current_id = on_disk.current_id
        self._seen = changed

    def rotate(self) -> MasterKey:
        """Add a fresh master key and make it current; older keys stay."""
        key = MasterKey.generate()
        with _locked(self.path):
            self._reload()
            self.keys[key.key_id] = key
            self.current_id = key.key_id
            self._save()
        logger.info("key store %s: master key %s is now current", self.path, key.key_id)
        return key

    def new_data_key(self) -> DataKey:
        """A fresh random data key, wrapped under the current master key."""
        master = self.current
        secret = secrets.token_bytes(KEY_BYTES)
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = AESGCM(master.secret).encrypt(nonce, secret, _wrap_aad(master.key_id))
        return DataKey(secret, master.key_id, nonce + sealed)

    def unwrap(self, master_key_id: str, wrapped: bytes) -> DataKey:
        """The data key ``wrapped`` under master key ``master_key_id``.

        Raises MissingKeyError when that master key is not held, and
        KeyStoreError when the wrapped key does not open (it was damaged).
        """
        master = self.get(master_key_id)
        if len(wrapped) != WRAPPED_KEY_BYTES:
            raise KeyStoreError(
                f"a wrapped data key is {WRAPPED_KEY_BYTES} bytes, not {len(wrapped)}"
            )
        nonce, sealed = wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:]
        try:
            secret = AESGCM(master.secret).decrypt(
                nonce, sealed, _wrap_aad(master_key_id)
            )
        except InvalidTag:
            raise KeyStoreError(
                f"the data key wrapped under master key {master_key_id} does "
                "not open: the wrapped key or its key id was altered"
            ) from None
        return DataKey(secret, master_key_id, wrapped)

    def export_escrow(self) -> str:
        """Every key as clear text for the operator's escrow (see the module)."""
        lines = [
            ESCROW_TITLE,
            "# Anyone holding this text can read every encrypted pack.",
            "# id     created              role     key",
        ]
        for key in sorted(self.keys.values(), key=lambda k: (k.created, k.key_id)):
            role = "current" if key.key_id == self.current_id else "previous"
            hex_key = key.secret.hex()
            groups = " ".join(hex_key[i : i + 8] for i in range(0, len(hex_key), 8))
            lines.append(f"{key.key_id} {key.created} {role:8} {groups}")
        return "\n".join(lines) + "\n"

    def _reload(self) -> None:
        if self.path.exists():
            on_disk = KeyStore.load(self.path)
            self.keys.update(on_disk.keys)

    def _save(self) -> None:
        document = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "current": self.current_id,
            "keys": [
                {"id": key.key_id, "created": key.created, "key": key.secret.hex()}
                for key in self.keys.values()
            ],
        }
        text = json.dumps(document, indent=2) + "\n"
        _write_private(self.path, text.encode("utf-8"))

    @classmethod
    def _from_json(cls, path: Path, text: str) -> KeyStore:
        try:
            document = json.loads(text)
            if document.get("format") != STORE_FORMAT:
                raise KeyStoreError(f"{path} is not a key store")
            if document.get("version") != STORE_VERSION:
                raise KeyStoreError(
                    f"{path} has key store version {document.get('version')}, "
                    f"this appliance reads version {STORE_VERSION}"
                )
            keys = [
                MasterKey.from_hex(item["id"], item["key"], item["created"])
                for item in document["keys"]
            ]
            current = document["current"]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DamagedKeyStore(f"{path} is damaged: {exc}") from exc
        return cls(path, {key.key_id: key for key in keys}, current)


def parse_escrow(text: str) -> tuple[list[MasterKey], str]:
    """The keys in an escrow text and the id of the one marked current."""
    # Typed back from paper in a Windows editor, the text may start with
    # a byte order mark.
    text = text.removeprefix("\ufeff")
    lines = [
        (number, line.strip())
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines or lines[0][1] != ESCROW_TITLE:
        raise KeyStoreError(f"not an escrow text: it must start with {ESCROW_TITLE!r}")

    keys: list[MasterKey] = []
    current: list[str] = []
    for number, line in lines[1:]:
        fields = line.split()
        role = fields[2].lower() if len(fields) > 2 else ""
        if len(fields) < 4 or role not in ("current", "previous"):
            raise KeyStoreError(
                f"escrow line {number}: expected 'id created role key', "
                "role current or previous"
            )
        try:
            key = MasterKey.from_hex(fields[0].lower(), "".join(fields[3:]), fields[1])
        except KeyStoreError as exc:
            raise KeyStoreError(f"escrow line {number}: {exc}") from None
        keys.append(key)
        if role == "current":
            current.append(key.key_id)

    if len(current) != 1:
        raise KeyStoreError(
            f"an escrow text marks exactly one key current, this one {len(current)}"
        )
    return keys, current[0]


def import_escrow(path: Path, text: str) -> KeyStore:
    """Add the keys of an escrow text to the store at ``path``.

    A new store (rebuilding on new hardware) takes the escrow's current key
    as current; an existing store keeps its own current key and gains the
    keys it lacked.
    """
    keys, current = parse_escrow(text)
    escrowed = {key.key_id: key for key in keys}
    with _locked(path):
        if path.exists():
            store = _load_for_import(path)
            added = sorted(escrowed.keys() - store.keys.keys())
            store.keys = escrowed | store.keys
        else:
            store = KeyStore(path, escrowed, current)
            added = sorted(escrowed)
        store._save()
    logger.info("key store %s: imported master keys %s", path, added or "none")
    return store


def _load_for_import(path: Path) -> KeyStore:
    """The store an escrow's keys join; a damaged one is named with the way
    out, since the import will not write over it."""
    try:
        return KeyStore.load(path)
    except DamagedKeyStore as exc:
        raise KeyStoreError(
            f"{exc}; to rebuild it from the escrow, move {path} aside (keep "
            "it: it may hold keys the escrow lacks) and import again"
        ) from exc


def _wrap_aad(master_key_id: str) -> bytes:
    return _WRAP_DOMAIN + master_key_id.encode("ascii")


def _refuse_open_folder(folder: Path) -> None:
    """Others could delete a store in a folder they may write, or put their
    own key in its place: the next start would make a key no escrow holds.
    Checked before a store is read and before one is written."""
    mode = folder.stat().st_mode
    if mode & 0o022:
        raise KeyStoreError(
            f"{folder} may be written by other users (mode "
            f"{stat.S_IMODE(mode):04o}); run chmod 700 on it"
        )


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` durably to ``path``, readable by its owner only."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _refuse_open_folder(path.parent)
        owner = _owner_to_keep(path if path.exists() else path.parent)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        durable.move_into_place(temp, path, path.parent)
    except OSError as exc:
        raise KeyStoreError(f"cannot write {path}: {exc.strerror}") from exc
    except StorageError as exc:
        raise KeyStoreError(str(exc)) from exc
    finally:
        temp.unlink(missing_ok=True)


def _remove_leftovers(path: Path) -> None:
    """Remove what a writer killed mid-write (power cut, SIGKILL) left: a
    temporary copy of the store, every key in it, that nothing reads. Only
    writers make them, and they hold the lock, as the caller does now."""
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            leftover.unlink()
        except OSError as exc:
            logger.warning("cannot remove the leftover %s: %s", leftover, exc)
        else:
            logger.info("removed %s, left by a key store write cut short", leftover)


def _owner_to_keep(reference: Path) -> tuple[int, int] | None:
    """The owner and group a file written as root takes: those of
    ``reference`` (the file it replaces, or its folder). Run as root, a
    ``keys rotate`` or ``import`` would otherwise leave a store, owner-only,
    that the service's own user cannot read: the service stops.
    None when not root (the file is the user's own) or nothing to follow."""
    if os.geteuid() != 0:
        return None
    try:
        found = reference.stat()
    except OSError:
        return None
    return found.st_uid, found.st_gid


def _keep_owner(path: Path, owner: tuple[int, int] | None) -> None:
    if owner is not None:
        os.chown(path, *owner)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock next to the store while it is read and written.

    The folder is made here, owner-only, since every change starts here.
    """
    folder = path.parent
    try:
        if not folder.is_dir():
            durable.make_directories(folder, Path(folder.anchor))
            os.chmod(folder, 0o700)
            _keep_owner(folder, _owner_to_keep(folder.parent))
        lock = folder / f"{path.name}.lock"
        made = not lock.exists()
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        if made:
            _keep_owner(lock, _owner_to_keep(folder))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise KeyStoreError(f"cannot open the key folder {folder}: {reason}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _remove_leftovers(path)
        yield
    finally:
        os.close(fd)
