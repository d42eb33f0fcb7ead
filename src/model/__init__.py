"""The model: a Llama-style decoder (`transformer`), its attention masks
(`masks`), the routed experts of a mixture-of-experts FFN (`moe`), the nested
widths of a MatFormer FFN (`matformer`) and the loss (`loss`). MLX only; the
PyTorch reference lives with the converter."""
