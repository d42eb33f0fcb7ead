"""Leaving MLX and coming back: export to PyTorch (`torch_export`, checked against
the reference model in `torch_model`), to Hugging Face with a model card (`hf`,
`card`) and to GGUF for llama.cpp and Ollama (`gguf`), and import from Hugging
Face (`hf_import`); the command is `python -m src.convert` (`cli`)."""
