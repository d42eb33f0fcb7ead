"""Where text comes from: local .txt, .jsonl/.json and .parquet files, folders and
globs of them, and Hugging Face hub datasets, read as one stream of documents.
No MLX, torch or tokenizer here: the tokenizer trains on a corpus and the token
files are made from one."""
