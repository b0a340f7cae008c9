"""The job queue in the database: job state machine, lease helpers, worker registry."""
