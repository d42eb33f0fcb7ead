"""Evaluation: the metrics the trainer's validation and `python -m src.eval` share
(`evaluator`: loss, perplexity, bits per byte), and the command (`cli`)."""
