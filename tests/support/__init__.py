"""Test helpers shared by the pacs_agent tests: DICOM validation, a stand-in PACS, small CT series."""
