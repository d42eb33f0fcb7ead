"""Checkpoints: atomic, verified folders of arrays and metadata (`store`), and what
they hold for a model: the meta written with it and the one loader that turns a
checkpoint back into a config, a model and a tokenizer (`contents`)."""
