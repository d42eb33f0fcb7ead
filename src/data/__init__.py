"""Token files: documents read from a corpus are filtered, deduplicated, split
and encoded (`documents`, `prepare`, on worker processes: `workers`) into the
token files the trainer reads (`tokens`) and, for chat data, the assistant masks
beside them (`masks`); `python -m src.data` (`cli`). No MLX or torch here."""
