"""Analysis: the worker process and the chain it runs (read sources, predict, write reports)."""
