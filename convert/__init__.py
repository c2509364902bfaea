"""Hugging Face Step-3.5 safetensors checkpoints to GGUF, and miniature checkpoints for tests."""
