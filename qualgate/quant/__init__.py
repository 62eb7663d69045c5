"""Quantizers as pure functions (codebooks, rotations, sketches, group quantization), kept apart from the
layers that put them in a model or a KV cache, so each can be checked against its definition."""
