"""Restore: rebuild the archive on a new appliance from the off-site mirror
(or from the offline volumes: :mod:`.volumes` and :mod:`.volumedata` take
the same two phases over the offline tier).

Two phases, each safe to interrupt and run again:

1. the catalog (:mod:`.rebuild`): from the latest catalog snapshot that
   opens and the journal segments after it, or from every pack's manifest
   (:mod:`.sources`); built beside the catalog, checked (:mod:`.check`),
   then moved into place (:mod:`.swap`). Every instance then has an
   off-site copy only.
2. the data (:mod:`.data`): instances brought back online study by study,
   newest first, through the recall path, from packs fetched into a local
   cache (:mod:`.cache`); each checked against its SHA-256 before the
   catalog counts its online copy. The final report (:mod:`.report`) names
   every instance restored, missing or corrupt.
"""
