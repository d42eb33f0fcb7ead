"""Generation in three layers: tokens over a KV cache (`cache`, `generate`,
`sampling`), text on top (`streaming`), and the command line and chat REPL on top
of that (`cli`, `chat`): `python -m src.inference`."""
