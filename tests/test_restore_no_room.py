"""A restore whose online tier has no room left: it stops with what it
needed and what to do, and continues once there is room."""

from __future__ import annotations

from pathlib import Path

from appliance.errors import OutOfSpaceError
from appliance.storage.online import OnlineTier
from tests.restore_site import Restored, mirror_settings

# More than any test machine's disk (1 PB): every instance eats into it.
_RESERVE = 10**15


def test_the_refusal_names_the_bytes_it_needed(tmp_path: Path) -> None:
    online = OnlineTier(tmp_path / "online", _RESERVE)
    online.open()

    try:
        online.check_room(12345)
    except OutOfSpaceError as exc:
        message = str(exc)
    else:
        raise AssertionError("a store into the reserve was not refused")

    assert "12345 bytes" in message and str(_RESERVE) in message


def test_a_restore_without_room_says_what_to_do_then_continues(site) -> None:
    restored, mirror = site
    full = Restored(
        restored.folder,
        mirror_settings(mirror),
        restored.escrow,
        {"storage": {"data_dir": str(restored.data_dir), "reserved_bytes": _RESERVE}},
    )

    stopped = full.restore()
    # The same data directory, its configuration written again without the
    # reserve: room was made.
    roomy = Restored(restored.folder, mirror_settings(mirror), restored.escrow)
    again = roomy.restore()

    assert stopped.returncode == 1
    assert "Traceback" not in stopped.stderr
    assert "storage.reserved_bytes" in stopped.stderr
    assert "run the restore again" in stopped.stderr
    assert again.returncode == 0, again.stderr
    assert len(roomy.report()["restored"]) > 0
