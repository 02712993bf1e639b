"""The archive's id as the offline volumes know it, kept in the data directory.

Every archive has one id, a random UUID: the catalog keeps it (``meta``,
:mod:`appliance.catalog.archive`), the mirror's identity marker names it,
and the label of every volume labelled since labels name an archive
carries it. Processes that open the volume library read it from this
copy beside the catalog, so that none needs the catalog open for it::

    DATA_DIR/archive-id     the id, one line

:mod:`appliance.hsm.archive` keeps the copy and the catalog's id the same.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from appliance.errors import StorageError
from appliance.storage import durable

logger = logging.getLogger(__name__)

FILE_NAME = "archive-id"
# An id is a UUID; anything longer in the file is not one.
_LONGEST = 64


def archive_id_path(data_dir: Path) -> Path:
    """Where the appliance under ``data_dir`` keeps its archive id."""
    return data_dir / FILE_NAME


def read_archive_id(data_dir: Path) -> str:
    """The archive id kept under ``data_dir``; empty when there is none."""
    path = archive_id_path(data_dir)
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise durable.translate_os_error(exc, f"cannot read {path}") from exc
    except ValueError as exc:
        raise StorageError(f"{path} does not hold an archive id: {exc}") from exc
    if not text or len(text) > _LONGEST or not text.isprintable():
        raise StorageError(f"{path} does not hold an archive id")
    return text


def write_archive_id(data_dir: Path, archive: str) -> None:
    """Keep ``archive`` as the id under ``data_dir``, durably (all or none
    of the file is there after a crash)."""
    path = archive_id_path(data_dir)
    temporary = path.with_name(f".{FILE_NAME}.{secrets.token_hex(4)}.tmp")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        temporary.write_text(archive + "\n", encoding="ascii")
        durable.move_into_place(temporary, path, data_dir)
    except OSError as exc:
        raise durable.translate_os_error(exc, f"cannot write {path}") from exc
    finally:
        if temporary.exists():
            os.unlink(temporary)
    logger.info("archive id %s kept in %s", archive, path)


class ArchiveIdFile:
    """This archive's id as read from the data directory when asked for:
    a library opened before the first volume is labelled (a service's
    worker, say) learns the id made then. Once found it is kept."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._known = ""

    def __call__(self) -> str:
        if not self._known:
            self._known = read_archive_id(self.data_dir)
        return self._known
