"""Prefetch: appointments from the RIS, and the priors they need online."""
