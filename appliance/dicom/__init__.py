"""The DICOM node: the pynetdicom AE, access control and the service handlers."""
