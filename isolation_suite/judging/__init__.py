"""Judging two traces: the invariants, the one judging path, coverage of a model."""
