"""Tests of pacs_agent.dicom."""
