"""What the administrator reads when the mirror's host key is not the
pinned one: the same words whichever SSH client found it out."""

from __future__ import annotations

from pathlib import Path


def unknown_host_message(host: str, offered: str, known_hosts: Path) -> str:
    """``offered`` is the key type and fingerprint, or "" when unknown."""
    key = f"the {offered} host key" if offered else "a host key"
    check = (
        "Check this fingerprint"
        if offered
        else f"Get its fingerprint (ssh-keyscan {host} | ssh-keygen -lf -) and check it"
    )
    return (
        f"the mirror {host} offered {key}, which {known_hosts} does not list, "
        f"so nothing was sent. {check} with the mirror's administrator "
        "(ssh-keygen -lf on the mirror's host key file), then add the "
        f"mirror's host key line to {known_hosts}"
    )


def changed_key_message(host: str, offered: str, pinned: str, known_hosts: Path) -> str:
    """``pinned`` says what known_hosts holds for the host (may be vague)."""
    key = f"the {offered} host key" if offered else "a host key"
    return (
        f"the mirror {host} offered {key}, but {known_hosts} pins {pinned} "
        "for it. Nothing was sent. Either the mirror was reinstalled or its "
        "key replaced, or someone is intercepting the connection. If the "
        "change is expected, check the new fingerprint with the mirror's "
        f"administrator and replace the mirror's line in {known_hosts}"
    )
