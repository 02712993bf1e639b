"""The HTTP server: DICOMweb, authentication, and the routes others add."""
