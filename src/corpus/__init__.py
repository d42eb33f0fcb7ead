"""Where text comes from: local .txt, .jsonl/.json and .parquet files, folders and
globs of them, and Hugging Face hub datasets, read as one stream of documents
through one protocol (`sources`: what a source is and how it is read; `text` and
`records`: the readers; `download`: TinyStories to a local .txt file). No MLX,
torch or tokenizer here: the tokenizer trains on a corpus and the token files are
made from one, so this package sits below both."""
