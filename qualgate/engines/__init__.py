"""Engines outside this process: GGUF conversion for llama.cpp (more with the engine-backends issue)."""
