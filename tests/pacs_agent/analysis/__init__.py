"""Tests of pacs_agent.analysis."""
