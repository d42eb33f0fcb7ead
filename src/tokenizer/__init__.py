"""The tokenizer: a SentencePiece model with fixed special ids and an exact round
trip (`spm`), its training on a corpus (`training`), and the command line
(`cli`: `python -m src.tokenizer train|encode|decode|stats`). No MLX or torch."""
