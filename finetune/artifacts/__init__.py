"""What a finished run becomes: a merged transformers folder, a GGUF file."""
