"""Export: every instance of the archive sent to another DICOM node by
C-STORE, as stored, resumable (a migration to another PACS).

:mod:`.destination` parses where it goes, :mod:`.state` keeps on disk what
the receiver accepted or refused, :mod:`.sender` holds the associations and
the C-STOREs, :mod:`.run` chooses, recalls and sends study by study, and
:mod:`.report` is the final account of what was sent, refused and not sent.
"""
