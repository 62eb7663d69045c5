"""A real compressed-tensors checkpoint of a bundled model, made with compressed-tensors' own API.

LLM Compressor (the usual producer) pins transformers <= 5.17 and compressed-tensors 0.19, which this
environment's transformers 5.24 excludes; its data-free W4A16 path is exactly what this does: the
preset scheme applied to every Linear but lm_head, min-max scales and zero points per group computed
by compressed-tensors' `calculate_qparams`, the weights packed eight per int32 ("pack-quantized") and
saved with the quantization_config transformers reads back.

`scale_factor` plants a wrong quantizer scale (the scales written, not the ones the weights need).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from qualgate.fixtures import bundled_model_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def make_checkpoint(out: Path, scheme: str = "W4A16", model: str = "target", scale_factor: float = 1.0) -> Path:
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    source = bundled_model_path(model)
    network = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    group = preset_name_to_scheme(scheme, ["Linear"])
    config = QuantizationConfig(config_groups={"group_0": group}, ignore=["lm_head"])
    apply_quantization_config(network, config)
    with torch.no_grad():
        for module in network.modules():
            if not hasattr(module, "weight_scale"):
                continue
            args = module.quantization_scheme.weights
            weight = module.weight.detach()
            groups = weight.reshape(weight.shape[0], -1, args.group_size or weight.shape[1])
            scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
            module.weight_scale.copy_((scale * scale_factor).reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(network, quantization_format="pack-quantized")
    compressor.compress_model(network)
    network.save_pretrained(out)
    compressor.update_config(str(out))
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, out / name)
    return out
