"""Decode-path fidelity: lossy stacks along greedy continuations, token by token through the cache."""

from qualgate.instruments.decode_path.path import (
    BaselinePath,
    baseline_paths,
    first_divergences,
    generic_schedules,
    run_decode_path,
    step_kl,
)

__all__ = ["BaselinePath", "baseline_paths", "first_divergences", "generic_schedules", "run_decode_path", "step_kl"]
