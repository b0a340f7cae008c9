"""Tests of pacs_agent.ingest."""
