"""``xorriso`` on ISO 9660 image files: create, append, verify, list, extract.

Every run records and loads MD5 checksums (``-md5 on`` before the image is
named, so that the checksums of earlier sessions are carried into each new
one), turns off pattern expansion (names are taken literally), and fails
with exit code 32 on any problem of severity SORRY or worse.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from appliance.errors import VolumeError
from appliance.storage.volumes.commands import run_tool

logger = logging.getLogger(__name__)

_COMMON = (
    "-no_rc",
    "-abort_on",
    "FAILURE",
    "-return_with",
    "SORRY",
    "32",
    "-report_about",
    "WARNING",
    "-iso_rr_pattern",
    "off",
    "-disk_pattern",
    "off",
    "-md5",
    "on",
)
# One line of "-exec lsdl": mode, links, owner, group, size, date, 'path'.
_LSDL = re.compile(r"^\S+\s+\d+\s+\S+\s+\S+\s+(\d+)\s+.*'([^']+)'$")
_MATCH = re.compile(r"^md5 match\s*:\s*'([^']+)'$", re.MULTILINE)


class Xorriso:
    """The xorriso program, run once per operation."""

    def __init__(self, program: str = "xorriso", timeout: float = 3600.0) -> None:
        self.program = program
        self.timeout = timeout

    def create(self, image: Path, volume_id: str, files: dict[str, Path]) -> None:
        """Write a new image holding ``files`` (ISO path -> disk file)."""
        self._run(
            "-outdev",
            f"stdio:{image}",
            "-volid",
            volume_id,
            *_map(files),
            "-mkdir",
            "/packs",
            "-commit",
        )

    def append(self, image: Path, files: dict[str, Path]) -> None:
        """Add ``files`` to an image as a new session (the image grows)."""
        self._run("-dev", f"stdio:{image}", *_map(files), "-commit")

    def verify(self, image: Path, iso_path: str) -> None:
        """Check one file's data against its recorded MD5; VolumeError if not."""
        output = self._run(
            "-indev", f"stdio:{image}", "-check_md5", "FAILURE", iso_path, "--"
        )
        if iso_path not in _MATCH.findall(output):
            raise VolumeError(
                f"{image}: {iso_path} has no recorded MD5 to check it against"
            )

    def verify_all(self, image: Path) -> None:
        """Check every data file of the image against its recorded MD5."""
        output = self._run(
            "-indev", f"stdio:{image}", "-check_md5_r", "FAILURE", "/", "--"
        )
        if "have no MD5" in output:
            raise VolumeError(f"{image}: some files have no recorded MD5")

    def list_files(self, image: Path, folder: str) -> dict[str, int]:
        """The files directly under ``folder`` in the image, name -> size."""
        output = self._run(
            "-indev",
            f"stdio:{image}",
            "-find",
            folder,
            "-maxdepth",
            "1",
            "-type",
            "f",
            "-exec",
            "lsdl",
            "--",
        )
        found = {}
        for line in output.splitlines():
            match = _LSDL.match(line.strip())
            if match:
                found[match.group(2).rsplit("/", 1)[-1]] = int(match.group(1))
        return found

    def extract(self, image: Path, iso_path: str, destination: Path) -> None:
        """Copy one file out of the image; its MD5 is checked on the way."""
        self._run(
            "-indev",
            f"stdio:{image}",
            "-osirrox",
            "on:check_md5_force",
            "-extract",
            iso_path,
            str(destination),
        )

    def _run(self, *arguments: str) -> str:
        return run_tool([self.program, *_COMMON, *arguments], self.timeout)


def _map(files: dict[str, Path]) -> list[str]:
    arguments = []
    for iso_path, disk_path in files.items():
        arguments += ["-map", str(disk_path), iso_path]
    return arguments


def volume_id(label: str) -> str:
    """The ISO 9660 volume id for a label (upper case, '_' for '-')."""
    return label.upper().replace("-", "_")[:32]
