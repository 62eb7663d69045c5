"""The equivalence instrument: greedy token identity of lossless layers, with a measured noise floor."""

from qualgate.instruments.equivalence.check import (
    EquivalenceResult,
    GenerationCheckpoint,
    load_prompts,
    run_equivalence,
)
from qualgate.instruments.equivalence.counters import aggregate_layer_stats
from qualgate.instruments.equivalence.divergence import Divergence, classify, first_divergence
from qualgate.instruments.equivalence.probes import Prompt, prefix_coverage, prefix_probes, speculation_probes
from qualgate.instruments.equivalence.tolerance import EquivalenceConfig, Tolerance, calibrate, measure_noise
from qualgate.instruments.generation import GENERATION_KINDS, reference_stack, without_generation_layers

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
