"""Catalog of stored studies, series and instances."""
