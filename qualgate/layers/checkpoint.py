"""A pre-quantized checkpoint as a weight layer: the model a team actually quantized (LLM Compressor's
compressed-tensors output, a GPTQ or AWQ export) evaluated against the baseline it was made from.

The in-process backend loads the checkpoint with transformers in the baseline's dtype; compressed-tensors
weights are decompressed to dense ones on load (`CompressedTensorsConfig(dequantize=True)`), so the
quantization error is exactly the checkpoint's and the matmuls are the baseline's. GPTQ and AWQ
checkpoints load through transformers' own integrations, which need their kernels (gptqmodel, autoawq)
on the device.

A checkpoint of another model would measure the wrong thing silently, so before anything runs its
architecture (config.json) and tokenizer are compared with the baseline's; a difference is exit 2
naming the field or token that differs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from qualgate.errors import ConfigError, MissingDependencyError
from qualgate.layers.base import LayerParams, WeightQuantLayer, register_layer
from qualgate.models import _directory_fingerprint

if TYPE_CHECKING:
    import torch

# What makes two checkpoints the same network: a quantized checkpoint keeps all of these.
ARCHITECTURE_FIELDS = (
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rope_theta",
    "rope_parameters",
    "tie_word_embeddings",
)
# quantization_config.quant_method -> the package its transformers integration needs
LOADERS = {"compressed-tensors": "compressed-tensors", "gptq": "gptqmodel", "awq": "autoawq"}
TOKENIZER_PROBE = "def f(x):\n    return x.__dict__['é'] + 1  # tokens, numbers 12345 and ünïcode"


class CheckpointParams(LayerParams):
    path: str = Field(description="directory of the quantized model (config.json with a quantization_config)")


def _config(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"weight_quant/checkpoint: {directory}/config.json cannot be read ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"weight_quant/checkpoint: {directory}/config.json is not a JSON object")
    return data


def quant_method(directory: Path) -> str | None:
    """The checkpoint's quantization_config.quant_method (None: a dense checkpoint)."""
    quant = _config(directory).get("quantization_config")
    return str(quant.get("quant_method")) if isinstance(quant, dict) else None


def architecture_differences(checkpoint: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    """`field checkpoint != baseline` for every architecture field the two configs disagree on."""
    return [
        f"{name} {checkpoint.get(name)!r} != baseline {baseline.get(name)!r}"
        for name in ARCHITECTURE_FIELDS
        if checkpoint.get(name) != baseline.get(name) and (name in checkpoint or name in baseline)
    ]


def tokenizer_differences(checkpoint: Any, baseline: Any) -> list[str]:
    """What differs between two tokenizers: special tokens, vocabulary, and how a probe text encodes."""
    found = []
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(checkpoint, name, None) != getattr(baseline, name, None):
            found.append(f"{name} {getattr(checkpoint, name, None)!r} != baseline {getattr(baseline, name, None)!r}")
    mine, theirs = checkpoint.get_vocab(), baseline.get_vocab()
    if mine != theirs:
        changed = sorted(set(mine.items()) ^ set(theirs.items()), key=str)[:3]
        found.append(f"vocabulary differs ({len(mine)} vs baseline {len(theirs)} entries; e.g. {changed})")
    elif checkpoint.encode(TOKENIZER_PROBE) != baseline.encode(TOKENIZER_PROBE):
        found.append("the same text encodes differently (merges or normalization differ)")
    return found


@register_layer
class Checkpoint(WeightQuantLayer[CheckpointParams]):
    """Weights from a quantized checkpoint of the baseline (compressed-tensors, GPTQ, AWQ)."""

    method: ClassVar[str] = "checkpoint"
    Params = CheckpointParams
    stem_params: ClassVar[tuple[str, ...]] = ("path",)

    def __init__(self, params: CheckpointParams, name: str | None = None) -> None:
        directory = Path(params.path).expanduser()
        if not (directory / "config.json").is_file():
            raise ConfigError(
                f"weight_quant/checkpoint: path '{params.path}' has no config.json; point it at the directory "
                "a quantization tool saved (LLM Compressor's save_pretrained output, a GPTQ/AWQ export)"
            )
        self.directory = directory
        super().__init__(params, name)

    def name_stem(self) -> str:
        return f"ckpt-{self.directory.resolve().name}"

    def identity(self) -> dict[str, Any]:
        # The files, not the path: a re-quantized checkpoint in the same directory is another layer.
        files = dict(_directory_fingerprint(self.directory))
        files["config.json"] = json.dumps(_config(self.directory), sort_keys=True)
        return {**super().identity(), "files": files}

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        # The same comparison as before the run (config.json as saved, not as transformers normalized it).
        baseline_dir = Path(str(getattr(model, "name_or_path", "") or model.config._name_or_path))
        self.check_model(baseline_dir, _config(baseline_dir))
        return self.load(model.dtype)

    def check_model(self, baseline_dir: Path, baseline_config: dict[str, Any]) -> None:
        """Exit 2 unless the checkpoint is the baseline's architecture with the baseline's tokenizer."""
        where = f"weight_quant/checkpoint '{self.params.path}'"
        differences = architecture_differences(_config(self.directory), baseline_config)
        if differences:
            raise ConfigError(f"{where} is not a quantization of the baseline model: {'; '.join(differences)}")
        if not any((self.directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            return  # no tokenizer shipped: the stack runs the baseline's, which is what an engine would use
        from transformers import AutoTokenizer

        differences = tokenizer_differences(
            AutoTokenizer.from_pretrained(self.directory), AutoTokenizer.from_pretrained(baseline_dir)
        )
        if differences:
            raise ConfigError(f"{where} ships another tokenizer than the baseline's: {'; '.join(differences)}")

    def load(self, dtype: torch.dtype) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        method = quant_method(self.directory)
        kwargs: dict[str, Any] = {"dtype": dtype}
        if method == "compressed-tensors":
            try:
                import compressed_tensors  # noqa: F401
                from transformers import CompressedTensorsConfig
            except ImportError as exc:
                raise MissingDependencyError("compressed-tensors", "weight_quant/checkpoint", extra="hf") from exc
            # Dense weights holding the checkpoint's dequantized values: its error, the baseline's kernels.
            kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        elif method in LOADERS:
            try:
                __import__(LOADERS[method].replace("-", "_"))
            except ImportError as exc:
                raise MissingDependencyError(LOADERS[method], f"a {method} checkpoint", extra=None) from exc
        elif method is not None:
            raise ConfigError(
                f"weight_quant/checkpoint '{self.params.path}': quant_method '{method}' is not one qualgate loads "
                f"in process ({', '.join(LOADERS)}); serve it with an engine backend instead"
            )
        try:
            with warnings.catch_warnings():
                # transformers warns that the checkpoint's own quantization_config is used with our
                # dequantize flag: that is the intent, and it says nothing to a user.
                warnings.filterwarnings("ignore", message=".*quantization_config.*", category=UserWarning)
                model = AutoModelForCausalLM.from_pretrained(self.directory, **kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"weight_quant/checkpoint '{self.params.path}' could not be loaded: {first}") from None
        return model.eval()
