"""Tests of pacs_agent.db."""
