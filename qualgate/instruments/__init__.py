"""Instruments: ways of measuring quality on a session (fidelity, equivalence, benchmarks, judge)."""
