"""Tests of pacs_agent.node."""
