"""Tests of pacs_agent.delivery."""
