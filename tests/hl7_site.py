"""A catalog with the HL7 listener and its real intake on a loopback port,
for tests that send messages with python-hl7's MLLP client and then look
at what the catalog holds. All patients, names and IDs are made up."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import hl7
from hl7.client import MLLPClient

from appliance.catalog.store import Catalog
from appliance.hl7.listener import Listener, ListenerSettings, bind
from appliance.ingest import Ingest
from appliance.prefetch.intake import Intake
from appliance.storage.online import OnlineTier
from tests import datasets


@dataclass
class Hl7Site:
    catalog: Catalog
    listener: Listener
    ingest: Ingest
    folder: Path

    def store(
        self, label: str, patient_id: str | None = None, name: str | None = None
    ) -> str:
        """One instance of a new study of ``patient_id`` (by default the
        label); the study's UID."""
        patient_id = patient_id or label
        study = datasets.uid("study", label)
        dataset = datasets.instance(
            study, datasets.uid("series", label), 1, patient_id=patient_id
        )
        if name is not None:
            dataset.PatientName = name
        path = datasets.write(dataset, self.folder / label)
        assert self.ingest.import_file(path, "test").ok
        return study

    def send(self, text: str) -> hl7.Message:
        """One message over MLLP with python-hl7's client; the parsed ACK."""
        host, port = self.listener.address
        with MLLPClient(host, port) as client:
            return hl7.parse(client.send_message(text).decode())


S = TypeVar("S", bound=Hl7Site)


@contextmanager
def running(tmp_path: Path, settings: ListenerSettings, kind: type[S]) -> Iterator[S]:
    """A site of ``kind`` (Hl7Site or a test's own subclass of it)."""
    catalog = Catalog(tmp_path / "catalog", map_size=2**26)
    online = OnlineTier(tmp_path / "online")
    online.open()
    ingest = Ingest(catalog, online, "replace")
    listener = Listener(bind("127.0.0.1", 0), Intake(catalog), settings)
    listener.start()
    try:
        yield kind(catalog, listener, ingest, tmp_path / "files")
    finally:
        listener.stop()
        ingest.close()
        catalog.close()
