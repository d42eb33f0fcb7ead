"""Benchmarks that the README's speed claims come from: the training step against
PyTorch and mlx-lm (`training`; `python scripts/benchmark.py`, or
`python -m src.bench`)."""
