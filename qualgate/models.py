"""Which weights and tokenizer a stack runs: ModelSpec, the bundled fixture models, identities."""

from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qualgate.devices import DEVICE_PATTERN
from qualgate.errors import ConfigError, MissingDependencyError
from qualgate.fixtures import BUNDLED_MODELS, bundled_model_path

if TYPE_CHECKING:
    import torch

Dtype = Literal["float32", "float16", "bfloat16"]
BUNDLED_PREFIX = "bundled:"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")
# The architecture (sizes, RoPE scaling, vocabulary): two checkpoints may share a tokenizer, and a
# golden or a record of one must never be taken for the other's.
_CONFIG_FILES = ("config.json", "chat_template.jinja")


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = f"{BUNDLED_PREFIX}target"
    """A local directory, a hub id already in the local HF cache, or `bundled:<name>`."""
    dtype: Dtype = "float32"
    device: str = Field(default="auto", pattern=DEVICE_PATTERN)
    """auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps: where the in-process model runs."""
    device_map: Literal["auto"] | None = None
    """auto: spread a model too large for one GPU over every visible GPU (accelerate's device_map)."""

    def torch_device(self) -> torch.device:
        from qualgate.devices import resolve

        return resolve(self.device)

    def local_path(self) -> Path | None:
        if self.path.startswith(BUNDLED_PREFIX):
            name = self.path[len(BUNDLED_PREFIX) :]
            if name not in BUNDLED_MODELS:
                raise ConfigError(
                    f"model path '{self.path}': no bundled model '{name}'; bundled: "
                    + ", ".join(f"{BUNDLED_PREFIX}{n}" for n in BUNDLED_MODELS)
                )
            path = bundled_model_path(name)
            if not (path / "config.json").is_file():
                raise ConfigError(
                    f"bundled model '{name}' is missing from {path}; rebuild the bundled models: "
                    "python -m qualgate.fixtures.train"
                )
            return path
        path = Path(self.path).expanduser()
        if path.exists():
            if not (path / "config.json").is_file():
                raise ConfigError(f"model path '{self.path}' has no config.json; point it at a HF model directory")
            return path
        if self.path.startswith((".", "/", "~")) or self.path.count("/") != 1:
            raise ConfigError(f"model path '{self.path}' does not exist; give a model directory or bundled:target")
        return None  # a hub id, resolved from the local HF cache when loaded

    def source(self) -> str:
        local = self.local_path()
        return str(local) if local is not None else self.path

    def torch_dtype(self) -> torch.dtype:
        import torch

        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.dtype]

    def fingerprint(self) -> dict[str, str]:
        """sha256 of every weight, tokenizer and config file: the model's identity in every cache key."""
        local = self.local_path()
        if local is None:
            return {"hub_id": self.path}
        return dict(_directory_fingerprint(local))


def _directory_fingerprint(directory: Path) -> tuple[tuple[str, str], ...]:
    files = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name in (*_TOKENIZER_FILES, *_CONFIG_FILES))
    )
    return tuple((p.name, _file_sha256(p)) for p in files)


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    # Keyed by size and mtime too: a rewritten file must never be served from the cache.
    return _sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=256)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_hf_model(spec: ModelSpec) -> Any:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise MissingDependencyError("transformers", "the hf backend", extra="hf") from exc
    options: dict[str, Any] = {"dtype": spec.torch_dtype()}
    if spec.device_map is not None:
        if importlib.util.find_spec("accelerate") is None:
            raise MissingDependencyError("accelerate", "model.device_map", extra="lmeval")
        options["device_map"] = spec.device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.source(), **options)
    except OSError as exc:
        raise ConfigError(
            f"model '{spec.path}' could not be loaded offline ({exc}); download it to a local directory first"
        ) from None
    if spec.device_map is None:
        model = model.to(spec.torch_device())
    return model.eval()


def input_device(model: Any) -> torch.device:
    """Where a model's input ids go: its embedding's device (the first GPU of a device_map)."""
    device: torch.device = model.get_input_embeddings().weight.device
    return device


def load_hf_tokenizer(spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec.source())
    except OSError as exc:
        raise ConfigError(f"tokenizer of model '{spec.path}' could not be loaded offline ({exc})") from None
