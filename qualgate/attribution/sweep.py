"""Per-unit sensitivity of a weight quantizer and the fewest units to keep at higher precision.

Each unit (a linear matrix, or a decoder layer) is quantized alone in the baseline model and scored
against the golden on a subset of its chunks: its KL with a chunk-clustered interval, same top-1, the
SQNR of its weights and the cosine of its outputs with the original's. The whole stack is measured on
the same chunks, so the sum of the singles can be set against it (their interaction). The plan then
keeps the units with the largest KL at the `keep` quantizer (or full precision), the fewest that bring
the pessimistic end of the KL interval under the threshold, and measures that mixed stack on every
chunk of the golden.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from qualgate.attribution.units import (
    Granularity,
    OutputCosine,
    Unit,
    find_units,
    quantize_alone,
    swap,
    weight_error,
)
from qualgate.chunking import Chunk
from qualgate.instruments.fidelity import FidelityConfig, TokenScores, compare, score_text

if TYPE_CHECKING:
    import torch

    from qualgate.backends.base import Session
    from qualgate.instruments.fidelity.instrument import GoldenData
    from qualgate.layers.base import WeightQuantLayer


@dataclass(frozen=True)
class GoldenSubset:
    """The golden's chunks and reference scores, whole and on the chunks the sweep scores."""

    config: FidelityConfig
    chunks: list[Chunk]
    reference: TokenScores
    picks: list[int]

    @classmethod
    def of(cls, data: GoldenData, chunks: int, **config: Any) -> GoldenSubset:
        """A run's golden read whole, `chunks` of its chunks picked over the text; `config` changes how
        they are scored (block_size for the KV sweep)."""
        with data.reference.rows() as rows:
            reference = rows.take(data.reference.n)
        fidelity = data.config.model_copy(update=config) if config else data.config
        return cls(fidelity, data.chunks, reference, spread(len(data.chunks), chunks))

    # Computed once: every unit of a sweep scores the same subset.
    @cached_property
    def sub_chunks(self) -> list[Chunk]:
        return [self.chunks[i] for i in self.picks]

    @cached_property
    def sub_reference(self) -> TokenScores:
        return self.reference.select(np.isin(self.reference.chunk, self.picks))


def spread(n_chunks: int, count: int) -> list[int]:
    """`count` chunk indices spread evenly over the text (first and last included)."""
    count = min(count, n_chunks)
    return sorted({round(i * (n_chunks - 1) / max(1, count - 1)) for i in range(count)})


def _kl(summary: dict[str, Any]) -> dict[str, float]:
    kl = summary["kl_mean"]
    return {"value": kl["value"], "low": kl["low"], "high": kl["high"]}


class Sweep:
    """Scores a baseline HF session with some of its modules swapped for quantized ones."""

    def __init__(self, session: Session, golden: GoldenSubset) -> None:
        self.session = session
        self.model: torch.nn.Module = session.model  # type: ignore[attr-defined]
        self.golden = golden

    def measure(self, whole: bool = False) -> dict[str, Any]:
        chunks = self.golden.chunks if whole else self.golden.sub_chunks
        reference = self.golden.reference if whole else self.golden.sub_reference
        scores = score_text(self.session, chunks, self.golden.config, reference=reference)
        summary = compare(reference, scores).summary
        return {
            "kl_mean": _kl(summary),
            "same_top1": summary["same_top1"]["value"],
            "ppl_ratio": summary["ppl_ratio"]["value"],
            "n_chunks": summary["n_chunks"],
            "n_tokens": summary["n_tokens"],
        }

    @contextmanager
    def swapped(self, modules: dict[str, torch.nn.Module]) -> Iterator[None]:
        """The model with `modules` in place of its own, restored however the block ends."""
        originals: dict[str, torch.nn.Module] = {}
        try:
            for name, module in modules.items():
                originals[name] = swap(self.model, name, module)
            yield
        finally:
            for name, module in originals.items():
                swap(self.model, name, module)


def attribute(
    session: Session,
    layer: WeightQuantLayer[Any],
    golden: GoldenSubset,
    threshold: float,
    granularity: Granularity = "matrix",
    keep: WeightQuantLayer[Any] | None = None,
    on_unit: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The sensitivity table, the whole stack on the same chunks, and the plan (see the module doc)."""
    started = time.perf_counter()
    sweep = Sweep(session, golden)
    units = find_units(sweep.model, bool(getattr(layer.params, "include_lm_head", False)), granularity)
    rows = []
    for index, unit in enumerate(units):
        quantized = quantize_alone(layer, sweep.model, [unit.name])[unit.name]
        original = sweep.model.get_submodule(unit.name)
        cosine = OutputCosine(original)
        handle = quantized.register_forward_hook(cosine, with_kwargs=True)
        try:
            with sweep.swapped({unit.name: quantized}):
                measured = sweep.measure()
        finally:
            handle.remove()
        signal, noise = weight_error(original, quantized, unit)
        rows.append(
            {
                "unit": unit.name,
                "matrices": len(unit.matrices),
                "kl_mean": measured["kl_mean"],
                "same_top1": measured["same_top1"],
                "sqnr_db": 10 * math.log10(signal / noise) if noise > 0 else float("inf"),
                "output_cosine": cosine.mean,
            }
        )
        if on_unit is not None:
            on_unit(index + 1, len(units))
    sweep_seconds = time.perf_counter() - started
    all_quantized = quantize_alone(layer, sweep.model, [u.name for u in units])
    with sweep.swapped(all_quantized):
        whole = sweep.measure()
    singles = float(sum(row["kl_mean"]["value"] for row in rows))
    for row in rows:
        row["share"] = row["kl_mean"]["value"] / singles if singles > 0 else float("nan")
    ranked = sorted(range(len(units)), key=lambda i: rows[i]["kl_mean"]["value"], reverse=True)
    plan = _plan(sweep, units, ranked, all_quantized, keep, threshold)
    return {
        "granularity": granularity,
        "chunks": golden.picks,
        "n_tokens": whole["n_tokens"],
        "threshold": threshold,
        "units": [rows[i] for i in ranked],
        "sum_of_singles": singles,
        "whole": whole,
        "interaction": whole["kl_mean"]["value"] - singles,
        "plan": plan,
        "sweep_seconds": sweep_seconds,
        "seconds": time.perf_counter() - started,
    }


def _plan(
    sweep: Sweep,
    units: Sequence[Unit],
    ranked: Sequence[int],
    all_quantized: dict[str, torch.nn.Module],
    keep: WeightQuantLayer[Any] | None,
    threshold: float,
) -> dict[str, Any]:
    """The fewest top-ranked units at `keep` that bring the KL's upper bound under the threshold.

    KL falls (nearly) monotonically as more of the worst units are kept, so the count is found by
    doubling then bisecting: about 2 log2(units) measurements instead of one per unit."""
    names = [units[i].name for i in ranked]
    kept_modules = (
        quantize_alone(keep, sweep.model, names)
        if keep is not None
        else {name: sweep.model.get_submodule(name) for name in names}
    )
    steps: dict[int, dict[str, Any]] = {}

    def mixed(count: int) -> dict[str, Any]:
        if count not in steps:
            chosen = set(names[:count])
            modules = {n: kept_modules[n] if n in chosen else all_quantized[n] for n in names}
            with sweep.swapped(modules):
                steps[count] = sweep.measure()
        return steps[count]

    def passes(count: int) -> bool:
        return bool(mixed(count)["kl_mean"]["high"] <= threshold)

    found: int | None = None
    if passes(0):
        found = 0
    else:
        low, high = 0, 1
        while high < len(names) and not passes(high):
            low, high = high, min(2 * high, len(names))
        if passes(high):
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (low, middle) if passes(middle) else (middle, high)
            found = high
    result: dict[str, Any] = {
        "keep": "full precision" if keep is None else keep.identity(),
        "keep_name": "full precision" if keep is None else keep.name,
        "steps": [{"kept": count, **steps[count]["kl_mean"]} for count in sorted(steps)],
        "found": found is not None,
    }
    if found is None:
        return result
    chosen = set(names[:found])
    with sweep.swapped({n: kept_modules[n] if n in chosen else all_quantized[n] for n in names}):
        verified = sweep.measure(whole=True)
    result.update(
        kept=names[:found],
        verified={**verified, "passes": verified["kl_mean"]["high"] <= threshold},
    )
    return result
