"""`instruments.equivalence` in a pipeline file: the prompts and tolerances of the lossless check, and
the decode-path check of lossy stacks that runs on the same prompts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from qualgate import golden
from qualgate.instruments.equivalence.check import load_prompts
from qualgate.instruments.equivalence.probes import Prompt
from qualgate.instruments.equivalence.tolerance import TOLERANCE_FACTOR, TOLERANCE_FLOOR, EquivalenceConfig
from qualgate.store import file_sha256
from qualgate.text_source import as_source

if TYPE_CHECKING:
    from qualgate.config import Pipeline


class EquivalenceSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: list[str] = Field(min_length=1)
    max_new_tokens: int = Field(EquivalenceConfig.model_fields["max_new_tokens"].default, ge=1)
    chat_template: bool = Field(False, description="prompt files' text through the model's chat template")
    eps: float = Field(EquivalenceConfig.model_fields["eps"].default, ge=0)
    # None: calibrated per check from the reference stack's own noise in the candidate's shapes.
    logprob_tolerance: float | None = Field(None, ge=0)
    tolerance_factor: float = Field(TOLERANCE_FACTOR, gt=0)
    tolerance_floor: float = Field(TOLERANCE_FLOOR, ge=0)
    # Prompt pairs built from domain text for prefix caching and acceptance groups for speculation.
    probes: bool = True
    probe_text: str | None = Field(None, description="text for the probes; default: the fidelity domain text")
    _probe_text = field_validator("probe_text", mode="before")(as_source)
    # Greedy continuations of lossy stacks scored as they serve (per-step KL, shape dependence).
    decode_path: bool = True

    def config(self) -> EquivalenceConfig:
        return EquivalenceConfig.model_validate(
            {
                "max_new_tokens": self.max_new_tokens,
                "chat_template": self.chat_template,
                "eps": self.eps,
                "logprob_tolerance": self.logprob_tolerance,
                "tolerance_factor": self.tolerance_factor,
                "tolerance_floor": self.tolerance_floor,
            }
        )

    def prompt_files(self) -> dict[str, str]:
        """Each prompt file by path with its content hash (part of every record's identity)."""
        return {p: file_sha256(Path(p)) for p in self.prompts}

    def load(self) -> list[Prompt]:
        return [p for path in self.prompts for p in load_prompts(Path(path))]


def probe_text_path(section: EquivalenceSection | None, pipeline: Pipeline) -> str | None:
    """The text the prefix-cache and speculation probes are cut from: the section's probe_text, else the
    fidelity domain text; None without either (or with probes: false)."""
    from qualgate.instruments.fidelity.instrument import Fidelity

    if section is None or not section.probes:
        return None
    if section.probe_text is not None:
        return section.probe_text
    fidelity = pipeline.config_of(Fidelity)
    if fidelity is None:
        return None
    return fidelity.text or golden.read_manifest(Path(fidelity.golden)).text.get("source")
