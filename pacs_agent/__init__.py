"""The DICOM node beside PACS: receive CTPAs, queue, analyse, report, deliver."""
