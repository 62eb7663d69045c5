"""The attribution instrument: in a pipeline, each distinct weight quantizer of its stacks split over
the matrices (or decoder layers) it quantizes, with the plan to pass (docs/attribution.md). Measured once
per quantizer (stacks sharing it reuse the record), in process on the pipeline's model; an engine-only
quantizer is measured through its in-process simulation (a GGUF type: the same file, dequantized)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qualgate.errors import ConfigError
from qualgate.gate import Finding
from qualgate.instruments.base import Gate, Instrument
from qualgate.instruments.fidelity.instrument import Fidelity

if TYPE_CHECKING:
    from qualgate.config import Pipeline
    from qualgate.run.context import RunContext
    from qualgate.stack import Stack

SUMMARY_ROWS = 5


class AttributionSection(BaseModel):
    """`instruments.attribution` in a pipeline file (it scores against the fidelity golden)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    granularity: Literal["matrix", "layer"] = "matrix"
    chunks: int = Field(8, ge=2, description="golden chunks scored per unit")
    keep: str | dict[str, Any] | None = Field(
        None, description="the kept units' quantizer: 'full', or changes to the stack's ({bits: 8}); default 8 bits"
    )
    threshold: float | None = Field(None, gt=0, description="KL bound of the plan; default gate.kl_mean warn")


class Attribution(Instrument[AttributionSection]):
    name = "attribution"
    Config = AttributionSection

    def __init__(self, config: AttributionSection) -> None:
        super().__init__(config)
        self.fidelity: Fidelity | None = None
        self.threshold: float | None = None

    def check(self, pipeline: Pipeline, where: str) -> None:
        section = pipeline.config_of(Fidelity)
        if section is None:
            raise ConfigError(
                f"{where}: instruments.attribution scores against the fidelity golden; add instruments.fidelity"
            )
        tiers = pipeline.gate.get("kl_mean")
        self.threshold = self.config.threshold or (tiers.warn or tiers.fail if tiers else None)
        if self.threshold is None:
            raise ConfigError(f"{where}: instruments.attribution needs a KL bound: set its threshold or gate.kl_mean")
        self.fidelity = Fidelity(section)
        self.fidelity.check(pipeline, where)

    def measure(self, stack: Stack, ctx: RunContext) -> dict[str, Any] | None:
        from qualgate.layers import WeightQuantLayer

        layer = stack.layer("weight_quant")
        if layer is None:
            return None
        if layer.engines:
            twin = layer.simulation()
            if not isinstance(twin, WeightQuantLayer):
                return {"skipped": f"layer '{layer.name}' has no in-process simulation to attribute"}
            layer = twin
        assert isinstance(layer, WeightQuantLayer)
        if self.fidelity is None:
            self.check(ctx.pipeline, ctx.where)
        assert self.fidelity is not None and self.threshold is not None
        data = self.fidelity.opened(ctx)
        key, record = ctx.lookup(
            {
                "instrument": "attribution",
                "model": ctx.pipeline.model.model_dump(),
                "files": ctx.pipeline.model.fingerprint(),
                "layer": layer.identity(),
                "config": self.config.model_dump(),
                "threshold": self.threshold,
                "golden": data.scores_sha256,
            }
        )
        if record is None:
            record = self._sweep(layer, data, ctx)
            ctx.put(key, record)
        return record

    def _sweep(self, layer: Any, data: Any, ctx: RunContext) -> dict[str, Any]:
        from qualgate.attribution.keep import keep_spec
        from qualgate.attribution.report import mixed_layer
        from qualgate.attribution.sweep import GoldenSubset, attribute
        from qualgate.backends import open_session
        from qualgate.layers.mixed import weight_layer
        from qualgate.stack import Stack

        assert self.threshold is not None
        layer_spec = {"method": layer.method, **layer.params.model_dump()}
        keep = keep_spec(self.config.keep, layer_spec, f"{ctx.where}: instruments.attribution.keep")
        golden = GoldenSubset.of(data, self.config.chunks)
        options = ctx.pipeline.backend.options if ctx.pipeline.backend.name == "hf" else {}
        with open_session(Stack(model=ctx.pipeline.model), "hf", **options) as session:
            result = attribute(
                session,
                layer,
                golden,
                self.threshold,
                self.config.granularity,
                None if keep is None else weight_layer(keep, f"{ctx.where}: instruments.attribution.keep"),
                ctx.progress(f"attribution {layer.name}"),
            )
        if result["plan"].get("kept"):
            result["plan"]["layer"] = mixed_layer(layer_spec, keep, result["plan"]["kept"])
        return {"layer_name": layer.name, "layer": layer_spec, **result}

    def findings(self, section: dict[str, Any], stack: Stack, gate: Gate) -> list[Finding]:
        return []  # a diagnosis, not a gate: the stack's own fidelity findings decide

    @classmethod
    def _distinct(cls, report: dict[str, Any]) -> list[dict[str, Any]]:
        """One section per quantizer (ladder stacks share it)."""
        seen: dict[str, dict[str, Any]] = {}
        for stack in report["stacks"]:
            section = stack.get("instruments", {}).get("attribution")
            if section and "units" in section:
                seen.setdefault(section["layer_name"], section)
        return list(seen.values())

    @classmethod
    def charts(cls, report: dict[str, Any], run_dir: Path) -> list[Path]:
        from qualgate.attribution.report import chart

        written = []
        for section in cls._distinct(report):
            path = run_dir / "plots" / f"attribution_{section['layer_name']}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            chart({"stack": section["layer_name"], **section}, path)
            written.append(path)
        return written

    @classmethod
    def summary_lines(cls, report: dict[str, Any]) -> list[str]:
        lines = []
        for section in cls._distinct(report):
            plan, name = section["plan"], section["layer_name"]
            lines += [
                "",
                f"### Where `{name}` loses (per {section['granularity']}, {len(section['chunks'])} chunks)",
                "",
                f"![KL per {section['granularity']}](plots/attribution_{name}.png)",
                "",
                "| unit | KL [95% CI] | share | weight SQNR (dB) | output cosine |",
                "| --- | --- | --- | --- | --- |",
            ]
            for row in section["units"][:SUMMARY_ROWS]:
                kl = row["kl_mean"]
                lines.append(
                    f"| `{row['unit']}` | {kl['value']:.2e} [{kl['low']:.2e}, {kl['high']:.2e}] | {row['share']:.1%} "
                    f"| {row['sqnr_db']:.1f} | {row['output_cosine']:.5f} |"
                )
            lines.append("")
            if not plan["found"]:
                lines.append(f"No plan reaches KL {section['threshold']:g} with every unit at {plan['keep_name']}.")
            elif plan["kept"]:
                kl = plan["verified"]["kl_mean"]
                lines.append(
                    f"Plan: keep {len(plan['kept'])} of {len(section['units'])} at {plan['keep_name']} "
                    f"({', '.join(f'`{u}`' for u in plan['kept'][:4])}{', ...' if len(plan['kept']) > 4 else ''}): "
                    f"KL {kl['value']:.2e} [{kl['low']:.2e}, {kl['high']:.2e}] on every chunk "
                    f"(bound {section['threshold']:g}); the `weight_quant/mixed` layer is in report.json."
                )
            else:
                lines.append(f"Nothing to keep: the whole quantizer is under KL {section['threshold']:g}.")
        return lines

    @classmethod
    def mlflow_metrics(cls, section: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        from qualgate.attribution.report import headline_metrics

        if "units" in section:
            yield from headline_metrics(section).items()

    @classmethod
    def mlflow_tables(cls, section: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        from qualgate.attribution.report import units_table

        return {"tables/attribution.json": units_table(section["units"])} if "units" in section else {}
