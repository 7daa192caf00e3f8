"""Model formats other than cllm's own .cllm file (cllm.checkpoint): Hugging Face folders and GGUF files, in and
out, and cllm's quantizer of GGML's block types."""
