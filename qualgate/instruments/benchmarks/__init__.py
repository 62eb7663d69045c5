"""The benchmarks instrument: lm-eval tasks through the stack under test, compared per sample."""
