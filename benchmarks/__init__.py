"""Benchmarks (not timed tests). Each runs with one command and writes JSON into reports/bench/."""
