"""The model: a Llama-style decoder (`transformer`) and its attention masks
(`masks`). MLX only; the PyTorch reference lives with the converter."""
