"""The node's processes and the ways people steer it (CLI, web dashboard)."""
