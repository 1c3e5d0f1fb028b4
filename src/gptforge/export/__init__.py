"""Export a gptforge model to the formats other tools read: a Hugging Face folder and GGUF (llama.cpp, Ollama)."""
