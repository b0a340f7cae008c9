"""Tests of pacs_agent.series."""
