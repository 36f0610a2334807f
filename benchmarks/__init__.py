"""The bench scripts (`python benchmarks/bench_<subject>.py`) and their one harness (benchmarks/harness.py);
figures and commands are in docs/benchmarks.md."""
