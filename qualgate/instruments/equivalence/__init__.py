"""The equivalence instrument: greedy token identity of lossless layers, with a measured noise floor."""

from qualgate.instruments.equivalence.check import (
    GENERATION_KINDS,
    Divergence,
    EquivalenceConfig,
    EquivalenceResult,
    GenerationCheckpoint,
    Tolerance,
    aggregate_layer_stats,
    calibrate,
    classify,
    first_divergence,
    load_prompts,
    measure_noise,
    reference_stack,
    run_equivalence,
    without_generation_layers,
)
from qualgate.instruments.equivalence.probes import Prompt, prefix_coverage, prefix_probes, speculation_probes

__all__ = [
    "GENERATION_KINDS",
    "Divergence",
    "EquivalenceConfig",
    "EquivalenceResult",
    "GenerationCheckpoint",
    "Prompt",
    "Tolerance",
    "aggregate_layer_stats",
    "calibrate",
    "classify",
    "first_divergence",
    "load_prompts",
    "measure_noise",
    "prefix_coverage",
    "prefix_probes",
    "reference_stack",
    "run_equivalence",
    "speculation_probes",
    "without_generation_layers",
]
