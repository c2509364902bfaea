"""Text: the tokenizer rebuilt from GGUF metadata, and the chat template."""
