"""Model runners (Llama family, Gemma 3), their configs, RoPE, weights, model sources and text."""
