"""Storage commitment, push model (PS3.4 Annex J): judging requests and
delivering their reports."""
