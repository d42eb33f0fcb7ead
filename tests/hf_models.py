"""Tiny Hugging Face models for tests: a byte-level BPE tokenizer trained with the
`tokenizers` library and saved by transformers (`train_bpe`), and a random Llama
or Qwen3 saved beside it (`save_model`, `hf_folder`), as a model on the Hub ships
them. Callers skip without torch/transformers/tokenizers (pytest.importorskip)
before calling these."""

from __future__ import annotations

from pathlib import Path

EOT = "<|endoftext|>"
VOCAB = 384  # 256 bytes + 1 special + 127 merges
CONTEXT = 64


def train_bpe(text: str, out: Path, vocab: int = VOCAB) -> Path:
    """A byte-level BPE (GPT-2 style) trained on `text` (documents separated by
    EOT lines), saved into `out` as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(text.split(f"\n{EOT}\n"), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOT, bos_token=EOT)
    fast.save_pretrained(out)
    return out


def save_model(folder: Path, kind: str, vocab: int, eos: int, seed: int = 0) -> Path:
    """A tiny random Llama or Qwen3 saved by transformers into `folder`; weights
    larger than the default init, so greedy choices are not near-ties."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    Config, Model = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }[kind]
    torch.manual_seed(seed)
    config = Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    model = Model(config).eval()
    model.save_pretrained(folder)
    return folder


def hf_folder(folder: Path, kind: str, tok_dir: Path, seed: int = 0) -> Path:
    """`folder` holding a tiny random `kind` model and a copy of the tokenizer in
    `tok_dir`: what `--checkpoint` and `--init-from` take."""
    from src.tokenizer.kinds import load_tokenizer

    tok = load_tokenizer(tok_dir)
    save_model(folder, kind, tok.vocab_size, tok.eos_id, seed)
    for f in tok_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder
