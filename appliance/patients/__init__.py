"""Patient updates and merges from registration (HL7 ADT) into the catalog."""
