"""``appliance migrate --now`` with rules that act on the same study in one
run: a move off online, then a copy to offline. The copy is made from the
online files before the move releases them, so one run leaves the study
where the rules say, and no rule's release is undone by a recall."""

from __future__ import annotations

from pathlib import Path

from appliance.catalog import copies
from appliance.catalog.store import Catalog
from tests.datasets import study_files, uid
from tests.test_recall_stopped_at_once import Archive, run

STUDY = uid("study", "rules")

MOVE_THEN_COPY = """
[[rules]]
name = "move-to-nearline"
action = "move"
from = "online"
to = "nearline"

[[rules]]
name = "copy-to-offline"
action = "copy"
to = "offline"
"""


def tiers_of(archive: Archive) -> set[str]:
    """The tiers every instance of the study has a copy on."""
    catalog = Catalog(archive.data_dir / "catalog", 2**26)
    try:
        records = copies.instances_of(catalog, STUDY)
    finally:
        catalog.close()
    return set.intersection(*({c.tier for c in r.copies} for r in records))


def online_files(archive: Archive) -> list[Path]:
    objects = archive.data_dir / "online" / "objects"
    return [path for path in objects.rglob("*") if path.is_file()]


def with_rules(tmp_path: Path) -> tuple[Archive, Path]:
    """An archive holding one study of three instances online (and nowhere
    else, so that the default min_copies of 1 lets it go), and a
    configuration with MOVE_THEN_COPY."""
    archive = Archive.at(tmp_path)
    study_files(tmp_path / "files", "rules", 3, pixel_bytes=2000)
    imported = run(archive.config_path, "import", str(tmp_path / "files"))
    assert imported.returncode == 0, imported.stdout + imported.stderr
    rules = tmp_path / "rules.toml"
    rules.write_text(archive.config_path.read_text() + MOVE_THEN_COPY)
    return archive, rules


def test_a_copy_after_a_move_reads_online_before_it_is_released(
    tmp_path: Path,
) -> None:
    archive, rules = with_rules(tmp_path)
    labelled = run(rules, "volumes", "label", "L00001", "--capacity", "1G")
    assert labelled.returncode == 0, labelled.stdout + labelled.stderr

    planned = run(rules, "migrate", "--dry-run")
    migrated = run(rules, "migrate", "--now")

    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert f"copy {STUDY} online -> offline" in planned.stdout
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert tiers_of(archive) - {"offsite"} == {"nearline", "offline"}
    assert online_files(archive) == []
    assert "recalled" not in migrated.stdout + migrated.stderr


def test_a_copy_that_cannot_be_made_brings_nothing_back_online(
    tmp_path: Path,
) -> None:
    # No volume is labelled: the copy to offline cannot be made. The move
    # still happens; at the next run the study is not recalled online for
    # a copy that would fail again (and be released again by the move).
    archive, rules = with_rules(tmp_path)

    first = run(rules, "migrate", "--now")
    second = run(rules, "migrate", "--now")

    assert first.returncode != 0
    assert "no reachable volume" in first.stdout + first.stderr
    assert second.returncode != 0
    assert "no volume can take packs" in second.stdout + second.stderr
    assert tiers_of(archive) - {"offsite"} == {"nearline"}
    assert online_files(archive) == []

    labelled = run(rules, "volumes", "label", "L00001", "--capacity", "1G")
    third = run(rules, "migrate", "--now")

    assert labelled.returncode == 0, labelled.stdout + labelled.stderr
    assert third.returncode == 0, third.stdout + third.stderr
    # Packed from a recall, whose online copy stays as a cache until the
    # next run's move releases it.
    assert tiers_of(archive) - {"offsite"} == {"online", "nearline", "offline"}
