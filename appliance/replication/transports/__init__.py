"""Transports to the off-site mirror: one interface, a folder and an SFTP
backend (through OpenSSH's ssh, or paramiko).

::

    with open_transport("sftp", config["mirror"]) as mirror:
        mirror.put("packs/123/p-000000123.pack", path, size, sha256)
        for chunk in mirror.get("packs/123/p-000000123.pack"):
            ...
"""

from appliance.replication.transports.base import ByteCallback, LocalBytes, Transport
from appliance.replication.transports.directory import DirectoryTransport
from appliance.replication.transports.factory import KINDS, open_transport
from appliance.replication.transports.names import is_valid_name, validate_name
from appliance.replication.transports.openssh import OpensshTransport
from appliance.replication.transports.settings import DirectorySettings, SftpSettings
from appliance.replication.transports.sftp import SftpTransport

__all__ = [
    "KINDS",
    "ByteCallback",
    "DirectorySettings",
    "DirectoryTransport",
    "LocalBytes",
    "OpensshTransport",
    "SftpSettings",
    "SftpTransport",
    "Transport",
    "is_valid_name",
    "open_transport",
    "validate_name",
]
