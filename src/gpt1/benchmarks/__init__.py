"""Throughput benchmarks, each `run(quick=False) -> list[dict]`, printed as a table by `gpt1 bench`."""
