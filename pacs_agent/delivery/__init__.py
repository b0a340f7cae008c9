"""Delivery of produced objects to destinations: the Target protocol, its transports (DIMSE C-STORE, DICOMweb STOW-RS) and the dispatcher."""
