"""Tests of pacs_agent.reports."""
