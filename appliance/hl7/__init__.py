"""HL7 v2 from the RIS: MLLP framing, the listener, message reading, ACKs."""
