"""A restore with another archive's master keys: what it says about the
mirror's catalog snapshots and journal, which are there but do not open."""

from __future__ import annotations

from appliance.storage.keys import key_store_path
from tests.restore_site import appliance


def test_the_refusal_says_the_snapshot_and_journal_do_not_open(site) -> None:
    restored, mirror = site
    assert list(mirror.glob("catalog/snapshot-*")) and list(mirror.glob("journal/*"))
    key_store_path(restored.data_dir).unlink()
    made = appliance("keys", "init", config=restored.config_path)
    assert made.returncode == 0, made.stderr

    wrong = restored.restore()

    assert wrong.returncode == 1
    refusal = wrong.stderr.splitlines()[-1]
    assert "nothing on the mirror opens with the master keys" in refusal
    assert "no catalog snapshot or journal)" not in refusal
    assert "snapshot" in refusal and "do not open" in refusal
