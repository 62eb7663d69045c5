"""Algorithm loss vs kernel loss: each engine stack measured twice against the same golden, once as the
engine deploys it and once simulated in process (the same quantization run with PyTorch's float
kernels: a GGUF type's weights dequantized into the HF model, qualgate's FP8 KV cache for vLLM's).

The simulated loss is what the quantization algorithm costs; the deployed loss minus it, per token and
paired on the same positions, is the engine's own contribution (its kernels, accumulation order, fused
ops, activation rounding). A large kernel share on a lossless-looking algorithm points at the engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from qualgate.backends import open_session
from qualgate.errors import ConfigError
from qualgate.gate import Finding
from qualgate.instruments.base import Gate, Instrument, estimate_metrics
from qualgate.instruments.fidelity.instrument import Fidelity, fidelity_record, per_token
from qualgate.instruments.generation import without_generation_layers
from qualgate.stack import Stack
from qualgate.stats import clustered_mean

if TYPE_CHECKING:
    from qualgate.backends.base import Backend, Session
    from qualgate.config import Pipeline
    from qualgate.run.context import RunContext

_METRICS = ("kl_mean", "same_top1", "ppl_ratio")
CHART = "plots/kernel_loss.png"  # in the run directory; linked from summary.md


class KernelLossSection(BaseModel):
    """`instruments.kernel_loss` in a pipeline file: on (`{}`) or off; it scores against the fidelity
    golden."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def simulated_stack(stack: Stack, backend: type[Backend] | None = None) -> Stack | str:
    """The stack with every layer replaced by its in-process simulation (as `backend` applies it), or
    why there is none."""
    layers = []
    for layer in stack.layers:
        twin = backend.simulation(layer, stack) if backend is not None else layer.simulation()
        if twin is None:
            return f"layer '{layer.name}' ({layer.kind}/{layer.method}) has no in-process simulation"
        layers.append(twin)
    label = Stack(model=stack.model, layers=tuple(layers)).label
    return Stack(model=stack.model, layers=tuple(layers), name=f"{label} (simulated)")


def _rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (stack["name"], section)
        for stack in report["stacks"]
        if (section := stack.get("instruments", {}).get("kernel_loss")) and "kernel" in section
    ]


def split_chart(rows: list[tuple[str, dict[str, Any]]], path: Path, title: str) -> None:
    """Per stack, the deployed KL as two stacked bars: the algorithm's (simulated) and the kernels'
    (their paired difference, with its interval), on a log axis so Q8_0 and Q2_K read on one chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, _ in rows]
    algorithm = [max(s["simulated"]["kl_mean"]["value"], 1e-9) for _, s in rows]
    kernel = [s["kernel"]["kl_mean"] for _, s in rows]
    figure, axes = plt.subplots(figsize=(max(6.0, 1.4 * len(rows) + 2), 4.2))
    positions = range(len(rows))
    axes.bar(positions, algorithm, color="#4878a8", label="algorithm (simulated in process)")
    added = [max(k["value"], 0.0) for k in kernel]
    axes.bar(positions, added, bottom=algorithm, color="#e07b39", label="kernels (deployed - simulated)")
    for i, (_, s) in enumerate(rows):
        deployed = s["deployed"]["kl_mean"]["value"]
        share = s["kernel_share"]
        label = f"{deployed:.2g}" + (f"\n{share:+.0%} kernel" if share == share else "")
        axes.annotate(label, (i, max(deployed, algorithm[i])), ha="center", va="bottom", fontsize=8)
    axes.set_yscale("log")
    axes.set_xticks(list(positions), names, fontsize=8)
    axes.set_ylabel("mean KL to the golden")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _view(summary: dict[str, Any]) -> dict[str, Any]:
    return {metric: summary[metric] for metric in _METRICS}


def paired_split(
    deployed: dict[str, np.ndarray], simulated: dict[str, np.ndarray], same_estimator: bool = True
) -> dict[str, Any]:
    """Deployed minus simulated, per token on the same positions, with chunk-clustered intervals.

    KL is compared with one estimator on both sides: when either side is only the top-k + tail-bucket
    bound (an HTTP engine returning its own top-k), both sides use the bound, so the difference is the
    engine's and not the estimators'."""
    if not np.array_equal(deployed["target"], simulated["target"]):
        raise ConfigError("kernel_loss: the deployed and simulated scores cover different tokens")
    chunks = deployed["chunk"]
    column = "kl" if same_estimator else "kl_bound"
    kl = clustered_mean(deployed[column] - simulated[column], chunks)
    top1 = clustered_mean(deployed["same_top1"].astype(float) - simulated["same_top1"].astype(float), chunks)
    ln_ratio = clustered_mean(deployed["nll_candidate"] - simulated["nll_candidate"], chunks)
    return {"kl_mean": kl.as_dict(), "same_top1": top1.as_dict(), "ppl_ratio": ln_ratio.map(np.exp).as_dict()}


class KernelLoss(Instrument[KernelLossSection]):
    name = "kernel_loss"
    Config = KernelLossSection
    metrics: ClassVar[dict[str, bool]] = {"kernel_kl": True}

    def __init__(self, config: KernelLossSection) -> None:
        super().__init__(config)
        self.fidelity: Fidelity | None = None

    def check(self, pipeline: Pipeline, where: str) -> None:
        section = pipeline.config_of(Fidelity)
        if section is None:
            raise ConfigError(
                f"{where}: instruments.kernel_loss splits the fidelity loss; add instruments.fidelity (a golden)"
            )
        if pipeline.backend.name == "hf":
            raise ConfigError(
                f"{where}: instruments.kernel_loss compares an engine with the in-process reference; "
                "set backend.name to an engine (llamacpp, vllm) or drop the section"
            )
        self.fidelity = Fidelity(section)
        self.fidelity.check(pipeline, where)

    def _fidelity(self, ctx: RunContext) -> Fidelity:
        if self.fidelity is None:
            self.check(ctx.pipeline, ctx.where)
        assert self.fidelity is not None
        return self.fidelity

    def measure(self, stack: Stack, ctx: RunContext) -> dict[str, Any]:
        fidelity = self._fidelity(ctx)
        data = fidelity.opened(ctx)
        measured = without_generation_layers(stack)
        twin = simulated_stack(measured, ctx.backend)
        if isinstance(twin, str):
            return {"skipped": twin}
        deployed = fidelity_record(data, stack, ctx)

        def in_process(s: Stack) -> Session:
            return open_session(s, "hf")

        simulated = fidelity_record(data, twin, ctx, opener=in_process, role="simulated")
        kinds = {r["summary"].get("kl_estimator", {}).get("kind", "bound") for r in (deployed, simulated)}
        split = paired_split(per_token(deployed, ctx), per_token(simulated, ctx), same_estimator=len(kinds) == 1)
        split["kl_estimator"] = kinds.pop() if len(kinds) == 1 else "bound"
        deployed_kl = deployed["summary"]["kl_mean"]["value"]
        return {
            # The layers as simulated: where the engine applies a layer differently from its name (vLLM's
            # CPU fp8_e4m3 cache is e5m2), the simulated stack's name says what was measured.
            "simulated": {"stack": twin.name, **_view(simulated["summary"])},
            "deployed": _view(deployed["summary"]),
            "kernel": split,
            # The engine's share of the deployed KL (it can exceed 1, or be negative, when kernels move
            # the distribution back toward the reference).
            "kernel_share": split["kl_mean"]["value"] / deployed_kl if deployed_kl > 0 else float("nan"),
            "n_tokens": deployed["summary"]["n_tokens"],
            "n_chunks": deployed["summary"]["n_chunks"],
        }

    def findings(self, section: dict[str, Any], stack: Stack, gate: Gate) -> list[Finding]:
        if "kernel" not in section:
            return []
        kl = section["kernel"]["kl_mean"]
        return [gate(self.finding("kernel_kl", kl, section["n_chunks"], "chunks"))]

    @classmethod
    def charts(cls, report: dict[str, Any], run_dir: Path) -> list[Path]:
        rows = _rows(report)
        if not rows:
            return []
        path = run_dir / CHART
        path.parent.mkdir(parents=True, exist_ok=True)
        split_chart(rows, path, f"{report['pipeline']}: algorithm vs kernel loss")
        return [path]

    @classmethod
    def summary_lines(cls, report: dict[str, Any]) -> list[str]:
        rows = _rows(report)
        if not rows:
            return []
        lines = [
            "",
            "### Algorithm vs kernel loss",
            "",
            "KL to the golden simulated in process (the algorithm), as the engine deploys it, and their paired "
            "difference (the engine's kernels).",
            "",
            f"![algorithm vs kernel loss]({CHART})",
            "",
            "| stack | algorithm KL | deployed KL | kernel KL [95% CI] | kernel share "
            "| same top-1 algorithm / deployed |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, s in rows:
            k = s["kernel"]["kl_mean"]
            lines.append(
                f"| {name} | {s['simulated']['kl_mean']['value']:.2e} | {s['deployed']['kl_mean']['value']:.2e} "
                f"| {k['value']:+.2e} [{k['low']:+.2e}, {k['high']:+.2e}] | {s['kernel_share']:.0%} "
                f"| {s['simulated']['same_top1']['value']:.4f} / {s['deployed']['same_top1']['value']:.4f} |"
            )
        return lines

    @classmethod
    def mlflow_metrics(cls, section: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        for side in ("simulated", "deployed", "kernel"):
            for metric in _METRICS:
                if side in section:
                    yield from estimate_metrics(f"kernel_loss/{side}_{metric}", section[side][metric])
        if "kernel_share" in section:
            yield "kernel_loss/kernel_share", section["kernel_share"]
