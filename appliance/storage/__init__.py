"""Tiers that hold instance bytes, and the one way files are written safely."""
