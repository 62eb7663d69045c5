"""GGUF files of a stack's model: the baseline converted once, each quant type made from it with
llama.cpp's own quantizer (llama_model_quantize), all cached by the model's fingerprint."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from pathlib import Path

from qualgate.engines.gguf_convert import convert
from qualgate.errors import ConfigError, InfrastructureError, MissingDependencyError
from qualgate.models import ModelSpec

# llama.cpp's enum llama_ftype values of the types the gguf layer offers.
FTYPES = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q2_K": 10,
    "Q3_K_M": 12,
    "Q4_K_S": 14,
    "Q4_K_M": 15,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "IQ4_NL": 25,
}


def model_key(spec: ModelSpec) -> str:
    blob = json.dumps({"path": spec.path, "files": spec.fingerprint()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _partial(out: Path) -> Path:
    # Per process: two runs sharing a cache directory may convert the same model at once; each writes
    # its own file and the last rename wins (the contents are the same).
    return out.with_name(f".{out.name}.{os.getpid()}.partial")


def baseline_gguf(spec: ModelSpec, cache_dir: Path) -> Path:
    """The model as an unquantized GGUF in its own dtype (float32 stays float32: the engine baseline)."""
    local = spec.local_path()
    if local is None:
        raise ConfigError(f"backend 'llamacpp': model '{spec.path}' must be a local directory to convert to GGUF")
    if spec.dtype == "bfloat16":
        raise ConfigError(
            "backend 'llamacpp': GGUF conversion writes f32 or f16; set model.dtype to float32 or float16"
        )
    dtype = "f32" if spec.dtype == "float32" else "f16"
    out = cache_dir / f"{local.name}-{model_key(spec)}-{dtype}.gguf"
    if not out.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = _partial(out)
        convert(local, partial, dtype=dtype)
        os.replace(partial, out)  # a crash mid-write never leaves a truncated file under the real name
    return out


def quantized_gguf(spec: ModelSpec, quant_type: str, cache_dir: Path, quantize_output: bool = True) -> Path:
    try:
        import llama_cpp
    except ImportError:
        raise MissingDependencyError("llama-cpp-python", "GGUF quantization", "llamacpp") from None
    if quant_type not in FTYPES:
        raise ConfigError(f"GGUF type '{quant_type}' is not one of {', '.join(FTYPES)}")
    source = baseline_gguf(spec, cache_dir)
    suffix = "" if quantize_output else "-fp-output"
    out = source.with_name(source.name.replace(source.name.rsplit("-", 1)[-1], f"{quant_type.lower()}{suffix}.gguf"))
    if out.is_file():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[quant_type]
    params.nthread = os.cpu_count() or 1
    params.quantize_output_tensor = quantize_output
    partial = _partial(out)
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    if code != 0 or not partial.is_file():
        raise InfrastructureError(f"llama_model_quantize({source.name} -> {quant_type}) failed with code {code}")
    os.replace(partial, out)
    return out
