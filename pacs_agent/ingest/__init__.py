"""From acknowledged instance to database row: the spool layout, receiver records, the writer thread, crash reconciliation."""
