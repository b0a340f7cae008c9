"""Receiving over DICOM: the storage SCP, its process pool, admission limit, TLS and pynetdicom adapter."""
