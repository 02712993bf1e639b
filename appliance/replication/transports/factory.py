"""Choosing and opening the mirror transport from the configuration."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from appliance.errors import ConfigError
from appliance.replication.transports.base import Transport
from appliance.replication.transports.directory import DirectoryTransport
from appliance.replication.transports.openssh import OpensshTransport
from appliance.replication.transports.settings import (
    DirectorySettings,
    SftpSettings,
    read_settings,
)
from appliance.replication.transports.sftp import SftpTransport

logger = logging.getLogger(__name__)

KINDS = ("directory", "sftp")


def open_transport(kind: str, settings: Mapping[str, object]) -> Transport:
    """The transport for ``mirror.kind``, built from the ``[mirror]`` keys.

    Raises ConfigError naming every wrong or missing key. A directory
    mirror checks its folder at once; an SFTP mirror connects on first use,
    through OpenSSH's ``ssh`` or through paramiko (``mirror.client``).
    """
    if kind == "directory":
        folder = read_settings(DirectorySettings, settings, kind)
        return DirectoryTransport(folder.path, folder.block_size)
    if kind == "sftp":
        chosen = read_settings(SftpSettings, settings, kind)
        if chosen.client == "openssh":
            return OpensshTransport(chosen)
        return SftpTransport(chosen)
    raise ConfigError([("mirror.kind", f"{kind!r} is not one of {', '.join(KINDS)}")])
