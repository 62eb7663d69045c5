"""The noise floor: the baseline against itself, run another way (block size or float format).

A threshold tighter than the floor cannot be met by any stack, however good: that is a configuration
error, not a pass or a fail.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qualgate.errors import ConfigError
from qualgate.fsio import atomic_write_text, read_text

NOISE_FLOOR = "noise_floor.json"
# metric name -> how to read the floor from a fidelity summary, and whether bigger is worse
FLOOR_METRICS: dict[str, tuple[tuple[str, ...], bool]] = {
    "kl_mean": (("kl_mean", "value"), True),
    "ppl_ratio": (("ppl_ratio", "high"), True),
    "same_top1": (("same_top1", "value"), False),
}


def save(golden_dir: Path, variant: dict[str, Any], summary: dict[str, Any]) -> Path:
    path = golden_dir / NOISE_FLOOR
    floors = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"variants": []}
    floors["variants"] = [v for v in floors["variants"] if v["variant"] != variant] + [
        {"variant": variant, "summary": summary}
    ]
    atomic_write_text(path, json.dumps(floors, indent=2) + "\n")
    return path


def floor_values(golden_dir: Path) -> dict[str, float]:
    """The worst value of each metric over the recorded variants (empty if none recorded)."""
    path = golden_dir / NOISE_FLOOR
    if not path.is_file():
        return {}
    fix = "re-measure it with qualgate golden noise-floor, or delete it"
    try:
        variants = json.loads(read_text(path, "noise floor"))["variants"]
        floors: dict[str, float] = {}
        for entry in variants:
            for metric, (keys, bigger_is_worse) in FLOOR_METRICS.items():
                value: Any = entry["summary"]
                for key in keys:
                    value = value[key]
                value = float(value)
                current = floors.get(metric)
                if current is None or (value > current if bigger_is_worse else value < current):
                    floors[metric] = value
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path} is not a noise floor qualgate wrote ({exc.__class__.__name__}); {fix}") from None
    return floors


def check_thresholds(thresholds: dict[str, float], floors: dict[str, float], where: str) -> None:
    """Refuse thresholds that the baseline itself, run another way, would not meet."""
    problems = []
    for metric, threshold in thresholds.items():
        if metric not in floors or metric not in FLOOR_METRICS:
            continue
        bigger_is_worse = FLOOR_METRICS[metric][1]
        floor = floors[metric]
        if (threshold <= floor) if bigger_is_worse else (threshold >= floor):
            problems.append(f"{metric} threshold {threshold:g} is below the noise floor {floor:.6g}")
    if problems:
        raise ConfigError(f"{where}: {'; '.join(problems)}; loosen it past the floor (qualgate golden noise-floor)")
