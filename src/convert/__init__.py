"""Leaving MLX and coming back: export to PyTorch (`torch_export`, checked against
the reference model in `torch_model`) and to Hugging Face, and import from it
(`hf`); the command is `python -m src.convert` (`cli`)."""
