"""The benchmarks instrument's pipeline settings (no lm-eval import: validating a pipeline stays fast)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class BenchmarksConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: list[str] = Field(min_length=1, description="lm-eval task names (local or built-in)")
    include: list[str] = Field(default_factory=lambda: ["evals/tasks"], description="task YAML directories")
    limit: int | None = Field(None, ge=2, description="documents per task (default: all)")
    num_fewshot: int | None = Field(None, ge=0)
    chat_template: bool = Field(False, description="render prompts with the model's chat template")
    metric: dict[str, str] = Field(default_factory=dict, description="task -> per-document 0/1 metric to pair")
    kv_block_size: int = Field(32, ge=1, description="block size for scoring through a quantized KV cache")
