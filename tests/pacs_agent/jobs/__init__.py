"""Tests of pacs_agent.jobs."""
