"""Scale-out tests: one receiver and several `pe-agent worker` hosts on PostgreSQL (and SQLite) with a shared spool."""
