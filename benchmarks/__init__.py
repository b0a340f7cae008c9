"""Benchmarks with their machine and date: ingest, latency, memory, worker throughput, the model (results in docs/BENCHMARKS.md)."""
