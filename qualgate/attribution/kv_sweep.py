"""K vs V: a KV cache's loss split between keys and values, over a grid of bit widths.

Every cell is the round-to-nearest KV cache (kv_quant/rtn) with its own key and value bits (a row or
column at full precision is the K-only or V-only variant), scored through the cache in blocks on a
subset of the golden's chunks; the pipeline's own KV layers are scored the same way beside them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from qualgate.attribution.sweep import GoldenSubset, Sweep
from qualgate.layers.kv_rtn import RTNKV, RTNKVParams

if TYPE_CHECKING:
    from qualgate.backends.base import Session
    from qualgate.layers.base import KVQuantLayer

FULL = "fp"  # the label of an unquantized side
FLOOR = 1e-8  # KL below this is the noise floor of the comparison: shown as ~0, no ratio taken


def kv_sweep(
    session: Session,
    golden: GoldenSubset,
    bits: Sequence[int],
    group_size: int,
    threshold: float,
    others: Sequence[KVQuantLayer[Any]] = (),
    on_cell: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """KL, same top-1 and storage bits for every (key bits, value bits) cell and every layer in `others`."""
    started = time.perf_counter()
    sweep = Sweep(session, golden)
    levels: list[int | None] = [*sorted(set(bits)), None]
    layers: list[tuple[dict[str, Any], KVQuantLayer[Any]]] = []
    for bits_k in levels:
        for bits_v in levels:
            if bits_k is not None or bits_v is not None:
                params = RTNKVParams(bits_k=bits_k, bits_v=bits_v, group_size=group_size)
                layers.append(({"bits_k": bits_k or FULL, "bits_v": bits_v or FULL}, RTNKV(params)))
    layers += [({"layer": layer.name}, layer) for layer in others]
    config = session.config  # type: ignore[attr-defined]
    original = session.kv_layer  # type: ignore[attr-defined]
    cells: list[dict[str, Any]] = []
    measured: list[dict[str, Any]] = []
    try:
        for index, (label, layer) in enumerate(layers):
            session.kv_layer = layer  # type: ignore[attr-defined]  # the cache the session builds per sequence
            result = sweep.measure()
            storage = layer.storage_bits(config, 16)
            row = {
                **label,
                "name": layer.name,
                "kl_mean": result["kl_mean"],
                "same_top1": result["same_top1"],
                "storage_bits": None if storage is None else storage["mean"],
                "passes": result["kl_mean"]["high"] <= threshold,
            }
            (cells if "bits_k" in label else measured).append(row)
            if on_cell is not None:
                on_cell(index + 1, len(layers))
    finally:
        session.kv_layer = original  # type: ignore[attr-defined]
    return {
        "levels": [level or FULL for level in levels],
        "group_size": group_size,
        "block_size": golden.config.block_size,
        "chunks": golden.picks,
        "n_tokens": golden.sub_reference.n,
        "threshold": threshold,
        "cells": cells,
        "layers": measured,
        "k_vs_v": k_vs_v(cells),
        "seconds": time.perf_counter() - started,
    }


def k_vs_v(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """At each bit width, the K-only and V-only KL and their ratio (> 1: keys are the sensitive side)."""
    by = {(c["bits_k"], c["bits_v"]): c["kl_mean"]["value"] for c in cells}
    rows = []
    for (k, v), value in by.items():
        if v == FULL and k != FULL and (FULL, k) in by:
            v_only = by[(FULL, k)]
            ratio = value / v_only if min(value, v_only) > FLOOR else None
            rows.append({"bits": k, "k_only": value, "v_only": v_only, "ratio": ratio})
    return rows


def heat_map(result: dict[str, Any], path: Any, title: str) -> None:
    """KL per (key bits, value bits), log colour scale, each cell annotated; passing cells framed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    levels = [str(level) for level in result["levels"]]
    grid = np.full((len(levels), len(levels)), np.nan)
    passing = np.zeros_like(grid, dtype=bool)
    for cell in result["cells"]:
        i, j = levels.index(str(cell["bits_k"])), levels.index(str(cell["bits_v"]))
        grid[i, j] = max(cell["kl_mean"]["value"], FLOOR)
        passing[i, j] = cell["passes"]
    figure, axes = plt.subplots(figsize=(1.2 * len(levels) + 2, 1.0 * len(levels) + 1.5))
    finite = grid[np.isfinite(grid)]
    norm = LogNorm(vmin=finite.min(), vmax=max(finite.max(), finite.min() * 10))
    image = axes.imshow(grid, cmap="viridis_r", norm=norm)
    for i in range(len(levels)):
        for j in range(len(levels)):
            if np.isfinite(grid[i, j]):
                text = f"{grid[i, j]:.1e}" if grid[i, j] > FLOOR else "~0"
                dark = float(norm(grid[i, j])) > 0.6  # viridis_r: high KL is dark
                axes.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
                if passing[i, j]:
                    axes.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#c0392b", lw=2))
            else:
                axes.text(j, i, "baseline", ha="center", va="center", fontsize=7, color="#555555")
    axes.set_xticks(range(len(levels)), levels)
    axes.set_yticks(range(len(levels)), levels)
    axes.set_xlabel("value bits")
    axes.set_ylabel("key bits")
    axes.set_title(f"{title}\nKL to the golden (framed: upper bound under {result['threshold']:g})", fontsize=9)
    figure.colorbar(image, ax=axes, label="mean KL")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(result: dict[str, Any], chart: str | None) -> list[str]:
    levels = [str(level) for level in result["levels"]]
    by = {(str(c["bits_k"]), str(c["bits_v"])): c for c in result["cells"]}
    lines = [
        f"## K vs V: KL of a round-to-nearest KV cache (groups of {result['group_size']} channels, "
        f"scored in blocks of {result['block_size']})",
        "",
        f"{len(result['cells'])} caches on {len(result['chunks'])} golden chunks in {result['seconds']:.0f} s; "
        f"rows key bits, columns value bits (`fp`: full precision); **bold**: upper bound under "
        f"{result['threshold']:g}.",
        "",
    ]
    if chart:
        lines += [f"![K x V heat map]({chart})", ""]
    lines += ["| K \\ V | " + " | ".join(levels) + " |", "| --- |" + " --- |" * len(levels)]
    for k in levels:
        cells = []
        for v in levels:
            cell = by.get((k, v))
            if cell is None:
                cells.append("baseline")
            else:
                text = f"{cell['kl_mean']['value']:.2e}"
                cells.append(f"**{text}**" if cell["passes"] else text)
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if result["k_vs_v"]:
        lines += ["", "| bits | K only | V only | K / V |", "| --- | --- | --- | --- |"]
        for row in result["k_vs_v"]:
            ratio = f"{row['ratio']:.1f}x" if row["ratio"] is not None else "-"
            lines.append(f"| {row['bits']} | {row['k_only']:.2e} | {row['v_only']:.2e} | {ratio} |")
    if result["layers"]:
        lines += ["", "The pipeline's own KV layers on the same chunks and blocks:", ""]
        lines += ["| layer | KL [95% CI] | same top-1 | bits per element |", "| --- | --- | --- | --- |"]
        for row in result["layers"]:
            kl = row["kl_mean"]
            bits = f"{row['storage_bits']:.2f}" if row["storage_bits"] is not None else "-"
            lines.append(
                f"| {row['name']} | {kl['value']:.2e} [{kl['low']:.2e}, {kl['high']:.2e}] | {row['same_top1']:.4f} "
                f"| {bits} |"
            )
    return lines
