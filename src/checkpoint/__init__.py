"""Checkpoints: atomic, verified folders of arrays and metadata (`store`), and what
they hold for a model: the meta written with it and the one loader that turns a
checkpoint, or a Hugging Face model folder, back into a config, a model and a
tokenizer of either kind (`contents`; a Hugging Face folder is read by
`hf_folder`)."""
