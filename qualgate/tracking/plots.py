"""PNG plots for a finished run: the compound-degradation waterfall per metric and the per-token KL
distribution of every stack. Rendered off-screen (Agg), so they work on servers and in CI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

WATERFALL_METRICS = {
    "kl_mean": "mean KL(P||Q) [nats]",
    "ln_ppl_ratio": "ln PPL ratio",
    "top1_loss": "1 - same-top-1",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def waterfall(report: dict[str, Any], metric: str, path: Path) -> bool:
    """Bars from the baseline up the ladder, each step adding its increment over the previous stack
    (red worse, green better), labelled with the running total; under each step, the stack's
    interaction term (its degradation minus the sum of its layers measured alone)."""
    compound = report.get("compound") or {}
    ladder = compound.get("ladder") or []
    baseline = (compound.get("baseline") or {}).get(metric)
    # Compound numbers come from fidelity: a pipeline without it (or a step it could not score) has none.
    if not ladder or baseline is None or any(row[metric]["vs_previous"] is None for row in ladder):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.7 * (len(ladder) + 1)), 4.4))
    labels = ["baseline"]
    levels: list[float] = []
    level = float(baseline)
    ax.bar(0, level, color="#7f7f7f")
    ax.annotate(f"{level:.3g}", (0, level), ha="center", va="bottom", fontsize=8)
    for i, row in enumerate(ladder, start=1):
        delta = float(row[metric]["vs_previous"])
        ax.bar(i, delta, bottom=level, color="#d62728" if delta > 0 else "#2ca02c", edgecolor="black", linewidth=0.5)
        level += delta
        levels.append(level)
        ax.annotate(f"{level:.3g}\n({delta:+.2g})", (i, level), ha="center", va="bottom", fontsize=8)
        interaction = row[metric]["interaction"]
        labels.append(f"+{row['layers'][-1]}\ninteraction {'-' if interaction is None else f'{interaction:+.2g}'}")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(WATERFALL_METRICS[metric])
    ax.set_title(f"{report['pipeline']}: compound {metric} along the ladder")
    ax.axhline(0, color="black", linewidth=0.6)
    low, high = min(0.0, *levels), max(0.0, *levels)
    ax.set_ylim(low - 0.05 * (high - low), high + 0.25 * (high - low or 1.0))  # room for the labels
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def kl_distribution(per_token_kl: dict[str, np.ndarray], path: Path, title: str) -> bool:
    """Empirical CDF of per-token KL per stack on a log axis: tails (the p99 a mean hides) show."""
    curves = {name: np.sort(kl[np.isfinite(kl)]) for name, kl in per_token_kl.items() if kl.size}
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    floor = 1e-10  # KL of identical rows is 0 (or float noise); clip so the log axis can show it
    for name, kl in curves.items():
        ax.step(np.maximum(kl, floor), np.arange(1, kl.size + 1) / kl.size, where="post", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("per-token KL(P||Q) [nats]")
    ax.set_ylabel("share of tokens <= x")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
