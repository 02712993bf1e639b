"""Hierarchical storage: migration policies (pure decisions) for now; the
migrator (copy, verify, commit, release) and recall will join them here."""
