"""`pe-agent demo`: the whole chain on synthetic CTPAs against an embedded PACS."""
