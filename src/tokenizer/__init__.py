"""Tokenizers of two kinds behind one interface (`kinds`: `load_tokenizer` picks
the kind of a folder): the SentencePiece model we train, with fixed special ids
and an exact round trip (`spm`; its training on a corpus: `training`), and a
Hugging Face tokenizer.json that a model comes with (`hf`); and the command line
(`cli`: `python -m src.tokenizer train|encode|decode|stats`). No MLX or torch."""
