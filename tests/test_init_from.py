"""`python -m src.train --init-from PATH`: a new run from another model's weights.

A tiny random Llama and Qwen3 saved by transformers (with a byte-level BPE trained
here, `hf_models`), and a run of configs/tiny.yaml, are each the source of a new
run: its first loss is the source model's on the batch of step 1 (computed
independently: transformers, or our model loaded from the source), its first
learning rate the warm-up's first, and its checkpoints record the source; the
new run then evaluates, generates, and exports to a folder transformers reads
with the same logits. The source is left byte-identical. Every refusal (a model
key that differs, a path that is no model, another tokenizer, `--resume` of a
Hugging Face folder, `--init-from` on a resume of a run from scratch) is one
`error:` line, exit 2, through a real subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from commands import run, user_error
from hf_models import CONTEXT, hf_folder, train_bpe

from src.data.loader import TokenLoader
from src.tokenizer.kinds import load_tokenizer

torch = pytest.importorskip("torch", reason="needs the torch extra")
transformers = pytest.importorskip("transformers", reason="needs transformers")
pytest.importorskip("tokenizers", reason="needs tokenizers")

SEED, BATCH, WARMUP, LR = 1234, 4, 10, 1e-3

# A fine-tune config: no model section, no tokenizer (both the source's).
FINE_TUNE = """\
data:
  train_path: {data}/train.bin
  val_path: {data}/val.bin
training:
  seed: {seed}
  batch_size: {batch}
  max_steps: {steps}
  learning_rate: {lr}
  warmup_steps: {warmup}
eval:
  interval: 0
  max_tokens: 512
  sample_tokens: 0
checkpoint:
  dir: {out}/ck
  interval: 0
logging:
  dir: {out}/logs
  interval: 5
  progress_bar: false
"""


def fine_tune_config(out: Path, data: Path, steps: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ft.yaml"
    path.write_text(FINE_TUNE.format(data=data, out=out, seed=SEED, batch=BATCH,
                                     steps=steps, lr=LR, warmup=WARMUP))  # fmt: skip
    return path


def train_rows(log_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").open()]
    return [r for r in rows if r.get("event") == "train"]


def first_batch(data: Path, context: int, vocab: int, sha: str) -> np.ndarray:
    """The batch of step 1, drawn as the trainer draws it: a pure function of
    (seed, step), (BATCH, context + 1)."""
    return TokenLoader(data / "train.bin", context, vocab, sha).batch(SEED, 0, BATCH)


def folder_state(path: Path) -> dict[str, str]:
    """Every file's sha256 and every link's target below `path`."""
    state = {}
    for p in sorted(path.rglob("*")):
        key = str(p.relative_to(path))
        if p.is_symlink():
            state[key] = "-> " + os.readlink(p)
        elif p.is_file():
            state[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return state


def expected_first_lr() -> float:
    from src.config import TrainingConfig
    from src.train.schedule import lr_at

    t = TrainingConfig(learning_rate=LR, warmup_steps=WARMUP, max_steps=20)
    return lr_at(t, 0)


@pytest.fixture(scope="module")
def bpe(story_corpus, tmp_path_factory) -> Path:
    """A byte-level BPE trained on the first ~300 KB of stories."""
    text = story_corpus(300_000).read_text(encoding="utf-8")
    return train_bpe(text, tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def bpe_data(bpe, story_corpus, tmp_path_factory) -> Path:
    """Token files of those stories, made with that tokenizer by the real CLI."""
    out = tmp_path_factory.mktemp("bpe-data") / "tokens"
    proc = run("data", "prepare", "--input", story_corpus(300_000),
               "--tokenizer", bpe, "--output", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def llama(bpe, tmp_path_factory) -> Path:
    return hf_folder(tmp_path_factory.mktemp("llama"), "llama", bpe)


# ------------------------------------------------- from a Hugging Face folder


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_fine_tune_a_hugging_face_model(kind, bpe, bpe_data, tmp_path):
    source = hf_folder(tmp_path / kind, kind, bpe, seed=1)
    before = folder_state(source)
    tok = load_tokenizer(source)
    config = fine_tune_config(tmp_path / "run", bpe_data, steps=20)
    proc = run("train", "--config", config, "--init-from", source)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"initialised from {source}" in proc.stderr

    # step 1: the imported model's loss on the batch of step 1, lr of the warm-up
    rows = train_rows(tmp_path / "run" / "logs" / "ft")
    assert [r["step"] for r in rows][:2] == [1, 2] and rows[-1]["step"] == 20
    batch = first_batch(bpe_data, CONTEXT, tok.vocab_size, tok.sha256)
    batch = torch.tensor(batch.astype(np.int64))
    model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.no_grad():
        logits = model(batch[:, :-1]).logits.double()
    want = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    ).item()
    assert abs(rows[0]["loss"] - want) < 1e-4 * max(1.0, want), (rows[0], want)
    assert rows[-1]["loss"] < want, "20 steps of training lower the loss"
    lr = expected_first_lr()
    assert lr < LR and abs(rows[0]["lr"] - lr) < 1e-9, (rows[0]["lr"], lr)

    # the new run: the source's architecture, tokenizer and provenance
    ckpt = tmp_path / "run" / "ck" / "ft" / "step_00000020"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["init_from"] == {
        "path": str(source.resolve()),
        "step": 0,
        "tokenizer_sha256": tok.sha256,
    }
    assert meta["config"]["training"]["init_from"] == str(source.resolve())
    m = meta["config"]["model"]
    assert (m["vocab_size"], m["d_model"], m["n_layers"], m["n_heads"]) == (
        tok.vocab_size, 64, 2, 4)  # fmt: skip
    assert (m["n_kv_heads"], m["d_ff"], m["qk_norm"], m["tie_embeddings"]) == (
        2, 128, kind == "qwen3", False)  # fmt: skip
    assert meta["tokenizer_sha256"] == tok.sha256
    assert load_tokenizer(ckpt / "tokenizer").sha256 == tok.sha256
    assert folder_state(source) == before, "the source is never modified"

    # the new run evaluates, generates and exports like any other
    val = bpe_data / "val.bin"
    proc = run(
        "eval", "--checkpoint", ckpt, "--data", val, "--max-tokens", 512, "--json"
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["step"] == 20
    proc = run("inference", "--checkpoint", ckpt, "--prompt", "Once upon a time",
               "--max-tokens", "5", "--temperature", "0")  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith("Once upon"), proc.stderr
    out = tmp_path / "export"
    proc = run("convert", "--checkpoint", ckpt, "--to", "hf", "--out", out)
    assert proc.returncode == 0, proc.stderr
    import mlx.core as mx

    from src.checkpoint.contents import load_model

    ours, _, _ = load_model(ckpt)
    ids = tok.encode("Once upon a time, there was a little")
    mine = np.array(ours(mx.array([ids])).astype(mx.float32))
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = again(torch.tensor([ids])).logits.numpy()
    diff = np.abs(mine - theirs)
    assert diff.max() < 1e-4, (diff.max(), diff.mean())


# ----------------------------------------------------- from our own checkpoint


def test_fine_tune_our_checkpoint(train_tiny, tiny_dataset, tmp_path):
    """--init-from a run folder (its best): step 0 with the source's weights (the
    first loss is the source model's on that batch), the source run untouched;
    --resume auto continues the new run (its weights, not the source's); naming a
    source on a resume of a run from scratch is refused."""
    import mlx.core as mx

    from src.checkpoint.contents import load_model

    ck_dir, _ = train_tiny(tmp_path / "src", training__max_steps=6,
                           checkpoint__interval=3, eval__interval=3)  # fmt: skip
    before = folder_state(ck_dir)
    best = (ck_dir / "best").resolve()
    data = tiny_dataset["train"].parent
    out = tmp_path / "run"
    config = fine_tune_config(out, data, steps=3)
    proc = run("train", "--config", config, "--init-from", ck_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert folder_state(ck_dir) == before, "the source run is never modified"

    model, tok, src_meta = load_model(best)
    m = model.config
    batch = mx.array(first_batch(data, m.context_length, m.vocab_size, tok.sha256))
    logits = model(batch[:, :-1]).astype(mx.float32)
    want = mx.mean(
        mx.logsumexp(logits, axis=-1)
        - mx.take_along_axis(logits, batch[:, 1:, None], axis=-1)[..., 0]
    ).item()
    rows = train_rows(out / "logs" / "ft")
    assert rows[0]["step"] == 1 and rows[-1]["step"] == 3
    assert abs(rows[0]["loss"] - want) < 1e-4, (rows[0]["loss"], want)
    assert abs(rows[0]["lr"] - expected_first_lr()) < 1e-9, rows[0]
    record = {"path": str(best), "step": src_meta["step"],
              "tokenizer_sha256": tok.sha256}  # fmt: skip
    meta = json.loads((out / "ck" / "ft" / "step_00000003" / "meta.json").read_text())
    assert (
        meta["init_from"] == record
        and meta["config"]["model"] == (src_meta["config"]["model"])
    )

    # resume: the run's own checkpoint, its source kept, however it is named now
    proc = run("train", "--config", config, "--init-from", ck_dir, "--resume",
               "auto", "--set", "training.max_steps=5")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "not init_from's" in proc.stderr
    assert "config change" not in proc.stderr.replace("1 config change", "")
    meta = json.loads((out / "ck" / "ft" / "step_00000005" / "meta.json").read_text())
    assert meta["init_from"] == record
    assert train_rows(out / "logs" / "ft")[-1]["step"] == 5
    # a source named for a run that started from scratch: refused, nothing changed
    proc = run("train", "--config", "configs/tiny.yaml", "--init-from", best,
               "--resume", "auto", "--set", f"checkpoint.dir={ck_dir.parent}",
               "--set", f"logging.dir={tmp_path / 'src' / 'logs'}",
               "--set", f"data.train_path={tiny_dataset['train']}",
               "--set", f"data.val_path={tiny_dataset['val']}",
               "--set", f"data.tokenizer_path={tiny_dataset['tokenizer']}",
               "--set", "training.max_steps=9")  # fmt: skip
    user_error(proc, "did not start from another model", "run_name")
    assert folder_state(ck_dir) == before


# -------------------------------------------------------------- refusals


def test_refusals_are_one_line(llama, bpe_data, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    config = fine_tune_config(out, bpe_data, steps=3)
    # a model key that differs: each named, with the source's and the given value
    proc = run("train", "--config", config, "--init-from", llama,
               "--set", "model.d_model=128", "--set", "model.n_heads=4",
               "--set", "model.n_kv_heads=4")  # fmt: skip
    user_error(proc, "model.d_model: source 64, given 128",
               "model.n_kv_heads: source 2, given 4")  # fmt: skip
    assert "n_heads:" not in proc.stderr  # given, and the same
    # the same keys, or context_length alone, agree: --show-config resolves them
    proc = run(
        "train",
        "--config",
        config,
        "--init-from",
        llama,
        "--show-config",
        "--set",
        "model.d_model=64",
        "--set",
        "model.context_length=32",
    )
    assert proc.returncode == 0, proc.stderr
    assert "d_model: 64" in proc.stdout and "context_length: 32" in proc.stdout
    assert f"tokenizer_path: {llama.resolve()}" in proc.stdout
    # training.init_from in the YAML is the same as the flag
    text = config.read_text().replace(
        "training:\n", f"training:\n  init_from: {llama}\n"
    )
    (tmp_path / "yaml.yaml").write_text(text + "model:\n  vocab_size: 999\n")
    user_error(run("train", "--config", tmp_path / "yaml.yaml"),
               "training.init_from=", "model.vocab_size: source 384, given 999")  # fmt: skip
    # neither a checkpoint nor a Hugging Face folder; no folder at all
    empty = tmp_path / "empty"
    empty.mkdir()
    user_error(run("train", "--config", config, "--init-from", empty),
               str(empty), "nor a Hugging Face model folder")  # fmt: skip
    user_error(run("train", "--config", config, "--init-from", tmp_path / "nope"),
               str(tmp_path / "nope"))  # fmt: skip
    # another tokenizer than the source's
    other = tiny_dataset["tokenizer"]
    proc = run("train", "--config", config, "--init-from", llama,
               "--set", f"data.tokenizer_path={other}")  # fmt: skip
    user_error(proc, f"data.tokenizer_path={other}", "not the source's tokenizer")
    # a Hugging Face folder is no run to resume
    user_error(run("train", "--config", config, "--resume", llama),
               f"--resume {llama}", f"--init-from {llama}")  # fmt: skip
    assert not (out / "ck").exists() and not (out / "logs").exists()


def test_model_options_come_from_the_source(tiny_dataset, tiny_config, tmp_path):
    """A source trained with model options (here GeGLU, LayerNorm, post-norm) gives
    them to a config that leaves them out, and a config that says otherwise is
    refused naming each key: the weights would load into another computation."""
    from mlx.utils import tree_flatten

    from src.checkpoint import store
    from src.checkpoint.contents import build_meta
    from src.errors import ConfigError
    from src.model.transformer import Model
    from src.train.init_from import resolve_config

    options = dict(mlp="geglu", norm="layernorm", norm_position="post",
                   value_embeddings=True, residual_scalars=True, logit_softcap=15.0,
                   sliding_window=8, global_every=2, moe_experts=2, moe_top_k=1)  # fmt: skip
    cfg = tiny_config(vocab_size=512, d_model=32, **options)
    sha = load_tokenizer(tiny_dataset["tokenizer"]).sha256
    weights = dict(tree_flatten(Model(cfg.model).parameters()))
    store.save_checkpoint(tmp_path / "src", 3, weights, {}, build_meta(cfg, sha),
                          tiny_dataset["tokenizer"])  # fmt: skip
    config = tmp_path / "ft.yaml"
    config.write_text(f"data:\n  tokenizer_path: {tiny_dataset['tokenizer']}\n")
    got, source = resolve_config(config, [], str(tmp_path / "src"))
    assert {k: getattr(got.model, k) for k in options} == options
    assert got.model.d_model == 32 and source is not None
    with pytest.raises(ConfigError) as exc:
        resolve_config(config, ["model.mlp=swiglu", "model.norm=rmsnorm"],
                       str(tmp_path / "src"))  # fmt: skip
    assert "model.mlp: source 'geglu', given 'swiglu'" in str(exc.value)
    assert "model.norm: source 'layernorm', given 'rmsnorm'" in str(exc.value)
