"""Which device the in-process model runs on: `model.device` resolved against what this machine has.

`auto` picks CUDA, then Apple's MPS, then the CPU. A device that is not present is exit 2 naming the
devices that are, before any model loads. Every tensor qualgate makes for a session is created on the
session's device, and only the few values a result keeps come back to the host.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from qualgate.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:[0-9]+)?)$"


@lru_cache(maxsize=1)
def present() -> tuple[str, ...]:
    """Every device torch can use here, by name (asked once: every record identity resolves the device)."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return tuple(found)


def resolve(name: str, where: str = "model.device") -> torch.device:
    """The torch device `name` means on this machine, or exit 2 naming what is present."""
    import torch

    found = present()
    if name == "auto":
        for kind in ("cuda:0", "mps"):
            if kind in found:
                return torch.device(kind)
        return torch.device("cpu")
    wanted = "cuda:0" if name == "cuda" else name
    if wanted not in found:
        raise ConfigError(
            f"{where} '{name}' is not present on this machine (found: {', '.join(found)}); "
            "use device: auto, or one of those"
        )
    return torch.device(wanted)


def describe(device: torch.device) -> dict[str, Any]:
    """What the report's provenance records about the device a model ran on."""
    import torch

    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        info["name"] = platform.processor() or platform.machine()
        info["capability"] = None
    return info
