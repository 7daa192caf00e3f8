"""Model formats other than cllm's own .cllm file (cllm.checkpoint): Hugging Face folders, in and out, and GGUF,
out."""
