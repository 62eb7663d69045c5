"""Convert a Hugging Face Llama checkpoint with a byte-level BPE tokenizer to GGUF (for llama.cpp).

llama.cpp's own converter lives in its source tree, not in any package a user installs with pip, and
it refuses tokenizers whose pre-tokenizer hash it does not know (every custom BPE tokenizer). This
writes the same layout with the `gguf` package: llama.* hyperparameters, the GPT-2 style byte-level
BPE vocabulary with merges, and the tensors with Q/K rows permuted into llama.cpp's rotary layout.
A test scores the bundled model through llama.cpp and through transformers and compares the logprobs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from qualgate.errors import ConfigError, MissingDependencyError

TENSOR_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def permute_rotary(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores each head's rotary pairs as two halves; llama.cpp interleaves them (as its converter)."""
    shape = (n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
    return np.asarray(weights.reshape(shape).swapaxes(1, 2).reshape(weights.shape))


def gguf_name(hf_name: str) -> str:
    if hf_name in TENSOR_NAMES:
        return TENSOR_NAMES[hf_name]
    parts = hf_name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
        suffix = ".".join(parts[3:])
        if suffix in LAYER_NAMES:
            return f"blk.{parts[2]}.{LAYER_NAMES[suffix]}"
    raise ConfigError(f"GGUF conversion: tensor '{hf_name}' has no llama.cpp name (only Llama models are supported)")


def _vocabulary(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str], dict[str, Any]]:
    data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") != "BPE":
        raise ConfigError(f"GGUF conversion: {model_dir}/tokenizer.json is {model.get('type')}, not byte-level BPE")
    tokens = [""] * vocab_size
    types = [1] * vocab_size  # 1 normal, 3 control, 5 unused
    for token, index in model["vocab"].items():
        tokens[index] = token
    special = {}
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = 3 if added.get("special") else 4
        special[added["content"]] = added["id"]
    for i, token in enumerate(tokens):
        if not token:
            tokens[i], types[i] = f"[PAD{i}]", 5
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges, special


def convert(model_dir: Path, out_path: Path, dtype: str = "f32") -> Path:
    """Write `out_path` (GGUF, f32 or f16 weights; norms always f32) from a HF Llama directory."""
    try:
        import gguf
        from safetensors.numpy import load_file
    except ImportError:
        raise MissingDependencyError("gguf", "GGUF conversion (llama.cpp)", "llamacpp") from None
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "llama":
        raise ConfigError(
            f"GGUF conversion: {model_dir} is a '{config.get('model_type')}' model; only llama is supported"
        )
    if dtype not in ("f32", "f16"):
        raise ConfigError(f"GGUF conversion: dtype must be f32 or f16 (got {dtype}); quantize afterwards")
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer = gguf.GGUFWriter(str(out_path), "llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(
        float(config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    )
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    tokens, types, merges, special = _vocabulary(model_dir, config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # byte-level, no prefix space: the GPT-2 pre-tokenizer
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, token_id in (
        ("bos", config.get("bos_token_id")),
        ("eos", config.get("eos_token_id")),
        ("pad", config.get("pad_token_id")),
    ):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(int(token_id))
    writer.add_add_bos_token(True)
    del special
    weights = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    if "lm_head.weight" not in weights and config.get("tie_word_embeddings"):
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    for name, tensor in weights.items():
        array = np.asarray(tensor, dtype=np.float32)
        if name.endswith("q_proj.weight"):
            array = permute_rotary(array, n_head)
        elif name.endswith("k_proj.weight"):
            array = permute_rotary(array, n_kv)
        if dtype == "f16" and array.ndim == 2:
            array = array.astype(np.float16)
        writer.add_tensor(gguf_name(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path
