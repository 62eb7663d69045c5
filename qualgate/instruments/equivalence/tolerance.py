"""The shared-prefix logprob tolerance of an equivalence check: measured as the reference stack's own
noise in the candidate's serving shapes, times a factor, never a constant."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from qualgate.instruments.equivalence.divergence import has_top
from qualgate.instruments.shapes import ShapeNoise, candidate_schedules, measure_shape_noise

# The calibrated tolerance: the candidate's drift is the same kernel noise the calibration samples (every
# verify-block phase, every prefix boundary), so its worst position sits near the noise's own tail: on
# the bundled stacks the candidate's max was at most 1.2x the noise's 99.9th percentile. Four times it
# leaves room for positions the calibration did not sample and stays far below what a real bug does (a
# stale cache block or a lossy acceptance rule moves chosen-token logprobs by 0.05-1 nats). The floor
# keeps float32 stacks, whose noise is ~1e-6, from failing on differences no kernel change can avoid.
TOLERANCE_FACTOR = 4.0
TOLERANCE_FLOOR = 1e-4
# A calibrated tolerance above this is far above float noise: the summary names the cause.
NOISY_REFERENCE = 0.01

if TYPE_CHECKING:
    from qualgate.backends.base import Generation, Session
    from qualgate.stack import Stack


class EquivalenceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # The one default for every caller (pipelines, `qualgate equivalence`): 24 tokens reach past the
    # first near-tie of most prompts, at half the cost of 48.
    max_new_tokens: int = Field(24, ge=1)
    chat_template: bool = Field(False, description="text prompts go through the model's chat template")
    eps: float = Field(0.125, ge=0, description="top-2 margin (nats) under which a divergence is a near-tie")
    logprob_tolerance: float | None = Field(
        None, ge=0, description="max |dlogprob| on the shared prefix; None: calibrated from the noise floor"
    )
    tolerance_factor: float = Field(
        TOLERANCE_FACTOR, gt=0, description="calibrated tolerance = max(tolerance_floor, factor x floor p99.9)"
    )
    tolerance_floor: float = Field(TOLERANCE_FLOOR, ge=0, description="smallest calibrated tolerance (nats)")
    top_k: int = Field(4, ge=2, description="per-step top-k kept from both sides (>= 2 to classify)")


@dataclass(frozen=True)
class Tolerance:
    """The shared-prefix logprob tolerance and where it came from."""

    value: float
    source: str  # "calibrated" or "pipeline"
    noise: dict[str, Any] | None  # the reference's noise floor (ShapeNoise.summary), when measured
    factor: float
    floor: float

    @property
    def margin(self) -> float:
        """How far the reference's top-1/top-2 margin was measured to move by noise: each of the two
        logprobs may move by the largest measured |delta logprob|, so their difference by twice it
        (without a measurement: twice the tolerance)."""
        if self.noise is None:
            return 2.0 * self.value
        return 2.0 * float(self.noise["logprob_delta"]["max"])

    def as_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "source": self.source,
            "factor": self.factor,
            "floor": self.floor,
            "noise_margin": self.margin,
            "noise_floor": self.noise,
        }


def calibrate(config: EquivalenceConfig, noise: ShapeNoise | None) -> Tolerance:
    """max(floor, factor x the noise floor's 99.9th percentile), or the pipeline's own value."""
    summary = noise.summary() if noise is not None and noise.logprob_delta.size else None
    if config.logprob_tolerance is not None:
        return Tolerance(config.logprob_tolerance, "pipeline", summary, config.tolerance_factor, config.tolerance_floor)
    p999 = summary["logprob_delta"]["p99.9"] if summary else 0.0
    value = max(config.tolerance_floor, config.tolerance_factor * p999)
    return Tolerance(value, "calibrated", summary, config.tolerance_factor, config.tolerance_floor)


def measure_noise(reference: Session, candidate_stack: Stack, generations: Sequence[Generation]) -> ShapeNoise | None:
    """The reference stack's own noise: its greedy sequences scored in the candidate's shapes.

    None when it cannot be measured: an endpoint whose prompt logprobs are unusable (generation-only),
    or that returns no logprobs of its generated tokens to compare a prefill with."""
    probe = getattr(reference, "probe", None)
    if probe is not None and not getattr(probe, "scoring", True):
        return None
    if not reference.capabilities.block_scoring and not all(has_top(g, len(g.token_ids), 1) for g in generations):
        return None
    return measure_shape_noise(
        reference,
        [(list(g.prompt_ids), list(g.token_ids)) for g in generations],
        lambda prompt_len, n_new, index: candidate_schedules(candidate_stack, prompt_len, n_new, seed=index),
        recorded=[g.top_logprobs[:, 0] if has_top(g, len(g.token_ids), 1) else np.zeros(0) for g in generations],
    )
