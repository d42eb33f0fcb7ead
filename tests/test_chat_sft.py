"""Chat SFT (issue 16, items 4-5): `prepare --chat` writes which tokens are the
assistant's (a mask file per split); training and validation count only those
targets (`training.loss_on`); a chat model exports with its chat template and
`<|end|>` among its EOS ids, so mlx-lm and transformers stop a reply there."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from src.data.documents import assistant_mask
from src.data.loader import TokenLoader
from src.data.masks import MASK_HEADER
from src.data.tokens import open_tokens
from src.template import CHAT, render_conversation

ROOT = Path(__file__).resolve().parents[1]
CHATS = ROOT / "docs" / "examples" / "chats.jsonl"
MULTI_TURN = [
    {"role": "system", "content": "You are a kind helper."},
    {"role": "user", "content": "What is the sun?"},
    {"role": "assistant", "content": "The sun is a star."},
    {"role": "user", "content": "Is it hot?"},
    {"role": "assistant", "content": "Yes, very hot."},
]


def _conversations() -> list[list[dict]]:
    lines = CHATS.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["messages"] for line in lines if line.strip()]


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def chat_data(tiny_dataset, tmp_path_factory) -> dict:
    """docs/examples/chats.jsonl prepared with --chat (the tiny dataset's
    tokenizer), and the same token files without their masks (plain data)."""
    from src.data import cli as data

    out = tmp_path_factory.mktemp("chat") / "data"
    tok = str(tiny_dataset["tokenizer"])
    args = ["prepare", "--input", str(CHATS), "--tokenizer", tok, "--chat",
            "--output", str(out), "--val-fraction", "0.3", "--workers", "1"]  # fmt: skip
    assert data.main(args) == 0
    plain = out.parent / "plain"
    plain.mkdir()
    meta = json.loads((out / "meta.json").read_text())
    for split in meta["splits"].values():
        shutil.copyfile(out / split["file"], plain / split["file"])
        del split["mask_file"], split["assistant_tokens"]
    (plain / "meta.json").write_text(json.dumps(meta))
    return {"dir": out, "plain": plain, "tokenizer": tiny_dataset["tokenizer"]}


def _expected_mask(messages, tok) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation, built turn by turn from the template: 1 for
    each reply's tokens and its <|end|>, 0 for the rest."""
    ids, mask = [], []
    for m in messages:
        if m["role"] == "system":
            part, flag = tok.encode(CHAT.system.format(m["content"])), 0
        elif m["role"] == "user":
            part, flag = tok.encode(CHAT.user.format(m["content"])), 0
        else:
            part, flag = tok.encode(m["content"] + CHAT.reply_end), 1
        ids += part
        mask += [flag] * len(part)
    return ids, mask


def test_prepare_chat_masks_exactly_the_assistant_spans(chat_data):
    """Every document of both splits, token by token: the mask file marks the
    replies and their <|end|>, never the system/user text, the <|assistant|>
    marker or EOS."""
    from src.tokenizer.spm import Tokenizer

    out, tok = chat_data["dir"], Tokenizer.load(chat_data["tokenizer"])
    meta = json.loads((out / "meta.json").read_text())
    expected = {}
    for messages in _conversations():
        ids, mask = _expected_mask(messages, tok)
        assert tok.decode(ids) == render_conversation(messages)
        expected[tuple(ids)] = mask
    seen = 0
    for split in ("train", "val"):
        info = meta["splits"][split]
        assert info["mask_file"] == f"{split}.mask.bin"
        ids = np.asarray(open_tokens(out / info["file"]))
        raw = (out / info["mask_file"]).read_bytes()
        assert len(raw) == MASK_HEADER.size + len(ids)
        mask = np.frombuffer(raw[MASK_HEADER.size :], np.uint8)
        assert info["assistant_tokens"] == int(mask.sum()) > 0
        ends = np.flatnonzero(ids == tok.eos_id)
        assert ends[-1] == len(ids) - 1
        for lo, hi in zip(np.r_[0, ends[:-1] + 1], ends, strict=True):
            doc = tuple(ids[lo:hi].tolist())
            assert doc in expected, tok.decode(list(doc))
            assert mask[lo:hi].tolist() == expected[doc], tok.decode(list(doc))
            assert mask[hi] == 0  # EOS
            seen += 1
    assert seen == len(expected) == 16


def test_assistant_mask_edge_cases():
    """A conversation ending on an open <|assistant|> marks nothing after it,
    not even the next document's tokens; chunks give the same mask as a whole."""
    A, E, EOS = 6, 7, 3
    # <|user|> x <|end|> <|assistant|> y z <|end|> EOS  <|user|> w <|end|>
    # <|assistant|> EOS  v <|end|> EOS
    ids = np.array([5, 10, E, A, 11, 12, E, EOS, 5, 13, E, A, EOS, 14, E, EOS])
    want = [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert assistant_mask(ids, A, E, (EOS,)).tolist() == want
    assert assistant_mask(ids[:8], A, E, (EOS,)).tolist() == want[:8]
    assert assistant_mask(ids[:0], A, E, (EOS,)).tolist() == []


def _tiny_model(tiny_config, accum=1, **training):
    from src.model.transformer import Model
    from src.train.optim import build_optimizer

    training = dict(batch_size=4, grad_accum_steps=accum, warmup_steps=2,
                    max_steps=20, learning_rate=3e-3, **training)  # fmt: skip
    cfg = tiny_config(training, vocab_size=61, context_length=16)
    mx.random.seed(0)
    model = Model(cfg.model)
    return model, build_optimizer(model, cfg.training), cfg


def _batch(accum=1, seed=0):
    rng = np.random.default_rng(seed)
    tokens = mx.array(rng.integers(0, 61, (accum, 4, 17)), dtype=mx.int32)
    mask = mx.array(rng.random((accum, 4, 17)) < 0.5)
    return tokens, mask


def test_gradient_is_zero_off_the_assistant_tokens(tiny_config):
    """d loss / d logits is exactly 0 where the mask is off (MLX autodiff), and
    the masked step does not see a target it does not count."""
    from src.model.loss import counted_targets, summed_cross_entropy
    from src.train.step import make_train_step

    rng = np.random.default_rng(1)
    logits = mx.array(rng.normal(size=(3, 8, 11)).astype(np.float32))
    targets = mx.array(rng.integers(0, 11, (3, 8)), dtype=mx.int32)
    mask = mx.array(rng.random((3, 9)) < 0.4)

    def loss(lg):
        return summed_cross_entropy(lg, targets, 0.1, mask[:, 1:]) / counted_targets(
            mask
        )

    grad = np.asarray(mx.grad(loss)(logits))
    off = ~np.asarray(mask[:, 1:])
    assert off.any() and (~off).any()
    assert np.all(grad[off] == 0.0), np.abs(grad[off]).max()
    assert np.all(np.abs(grad[~off]).sum(-1) > 0)

    # the step: a batch that differs only in a target the mask does not count
    # (the last token of a window is only a target) trains identically
    tokens, mask = _batch()
    keep, changed = np.array(mask), np.array(tokens)
    keep[0, 0, -1] = False
    changed[0, 0, -1] = (changed[0, 0, -1] + 1) % 61
    mask = mx.array(keep)
    results = []
    for batch in (tokens, mx.array(changed)):
        model, opt, cfg = _tiny_model(tiny_config)
        step = make_train_step(model, opt, cfg.training, masked=True)
        loss_value, _, ok = step(batch, mask)
        mx.eval(model.state, opt.state, loss_value)
        results.append((loss_value.item(), dict(tree_flatten(model.parameters()))))
    assert results[0][0] == results[1][0]
    for k, v in results[0][1].items():
        assert mx.array_equal(v, results[1][1][k]), k


def test_masked_step_is_the_mean_over_counted_targets(tiny_config):
    """The masked step's loss is the mean over the counted targets of all its
    micro-batches (hand computation); compiled == eager; a step that counts no
    target has loss 0 and zero gradients, not NaN."""
    from src.train.step import make_train_step

    tokens, mask = _batch(accum=2, seed=3)
    model, opt, cfg = _tiny_model(tiny_config, accum=2)
    logits = np.concatenate([np.asarray(model(tokens[i][:, :-1])) for i in range(2)])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    t = np.asarray(tokens).reshape(8, 17)[:, 1:]
    keep = np.asarray(mask).reshape(8, 17)[:, 1:]
    nll = -np.take_along_axis(logp, t[..., None], -1)[..., 0]
    want = nll[keep].sum() / keep.sum()

    losses = []
    for compile in (False, True):
        model, opt, cfg = _tiny_model(tiny_config, accum=2)
        step = make_train_step(model, opt, cfg.training, compile=compile, masked=True)
        loss, _, ok = step(tokens, mask)
        mx.eval(model.state, opt.state, loss, ok)
        assert ok.item()
        losses.append(loss.item())
    assert abs(losses[0] - want) < 1e-5, (losses[0], want)
    assert losses[0] == losses[1]

    model, opt, cfg = _tiny_model(tiny_config, accum=2)
    step = make_train_step(model, opt, cfg.training, masked=True)
    loss, grad_norm, ok = step(tokens, mx.zeros_like(mask))
    mx.eval(loss, grad_norm, ok)
    assert loss.item() == 0.0 and grad_norm.item() == 0.0 and ok.item()


def test_masked_validation_equals_hand_computation(chat_data, tiny_config):
    """Masked validation: the mean loss over the counted targets and bits per byte
    over their bytes, computed by hand from the model's logits."""
    from src.eval.evaluator import Evaluator, make_eval_fn
    from src.model.transformer import Model
    from src.tokenizer.spm import Tokenizer

    tok = Tokenizer.load(chat_data["tokenizer"])
    cfg = tiny_config(vocab_size=512, context_length=16)
    mx.random.seed(0)
    model = Model(cfg.model)
    loader = TokenLoader(chat_data["dir"] / "val.bin", 16, 512)
    assert loader.has_mask
    ev = Evaluator(loader, 3, None, tok.decode, masked=True)
    got = ev(make_eval_fn(model, masked=True))

    total, count, n_bytes = 0.0, 0, 0
    for batch, mask in loader.val_batches(3, None, with_mask=True):
        logits = np.asarray(model(mx.array(batch[:, :-1])), np.float64)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, batch[:, 1:, None], -1)[..., 0]
        total += nll[mask[:, 1:]].sum()
        count += int(mask[:, 1:].sum())
        for row, keep in zip(batch, mask, strict=True):
            n_bytes += len(tok.decode(row[1:][keep[1:]].tolist()).encode())
    assert got.tokens == count > 0 and got.bytes == n_bytes > 0
    assert abs(got.loss - total / count) < 1e-5, (got.loss, total / count)
    want_bpb = total / math.log(2) / n_bytes
    assert abs(got.bits_per_byte - want_bpb) < 1e-5
    plain = Evaluator(loader, 3, None, tok.decode)(make_eval_fn(model))
    assert plain.tokens > got.tokens and plain.loss != got.loss


def _losses(log_dir: Path) -> list:
    rows = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def chat_runs(chat_data, train_tiny, tmp_path_factory):
    """Three short runs: chat data with loss_on auto (the assistant's tokens) and
    all, and the same token files without masks (plain data)."""
    out = tmp_path_factory.mktemp("runs")
    kw = dict(training__max_steps=6, eval__interval=6, eval__max_tokens=512,
              checkpoint__interval=6, eval__sample_tokens=0, logging__interval=1)  # fmt: skip
    runs = {}
    for name, folder, loss_on in (
        ("chat", chat_data["dir"], "auto"),
        ("all", chat_data["dir"], "all"),
        ("plain", chat_data["plain"], "auto"),
    ):
        runs[name] = train_tiny(
            out / name, data__train_path=folder / "train.bin",
            data__val_path=folder / "val.bin", training__loss_on=loss_on, **kw,
        )  # fmt: skip
    return runs


def test_loss_on_all_is_the_plain_loss_bit_for_bit(chat_runs):
    """loss_on: all on chat data trains exactly as the same tokens without a mask;
    the default (auto) on chat data counts the replies only, and says so."""
    chat, every, plain = (_losses(chat_runs[k][1]) for k in ("chat", "all", "plain"))
    assert every == plain and len(every) == 6
    assert all(a != b for (_, a), (_, b) in zip(chat, every, strict=True))
    log = (chat_runs["chat"][1] / "train.log").read_text()
    assert "loss on the assistant's tokens only (training.loss_on=auto)" in log
    assert "assistant's tokens" not in (chat_runs["plain"][1] / "train.log").read_text()


def test_eval_cli_scores_the_assistant_tokens(chat_runs, chat_data):
    """`python -m src.eval` on a token file with a mask reports the masked loss,
    the number the run's own validation logged."""
    ck, logs = chat_runs["chat"]
    proc = _python("-m", "src.eval", "--checkpoint", str(ck / "step_00000006"),
                   "--data", str(chat_data["dir"] / "val.bin"), "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    rows = [json.loads(x) for x in (logs / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in rows if "val_loss" in x][-1]
    assert r["loss_on"] == "assistant" and r["tokens"] == val["val_tokens"]
    assert abs(r["loss"] - val["val_loss"]) < 1e-4, (r["loss"], val["val_loss"])


def _force_next_token(folder: Path, token: int) -> None:
    """Rewrite an exported model so that greedy decoding always picks `token`:
    every block adds nothing to the residual stream, and the (tied) embedding
    makes `token`'s logit twice every other one."""
    path = folder / "model.safetensors"
    weights = mx.load(str(path))
    for k, v in weights.items():
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            weights[k] = mx.zeros_like(v)
        elif k == "model.norm.weight":
            weights[k] = mx.ones_like(v)
    embed = np.zeros(weights["model.embed_tokens.weight"].shape, np.float32)
    embed[:, 0], embed[token, 0] = 1.0, 2.0
    weights["model.embed_tokens.weight"] = mx.array(embed)
    if "lm_head.weight" in weights:
        weights["lm_head.weight"] = mx.array(embed)
    path.unlink()
    mx.save_safetensors(str(path), weights, {"format": "pt"})


def test_chat_export_stops_at_the_end_of_the_reply(chat_runs, tmp_path):
    """`--to hf` of a chat run: <|end|> is among the EOS ids of config.json and
    generation_config.json; the exported chat template renders our ids for a
    multi-turn conversation with a system prompt; mlx-lm loads it with a chat
    template and <|end|> as EOS, and mlx-lm and transformers greedy generation
    stop at <|end|> (and run on when another token is forced)."""
    from mlx_lm import generate, load
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from src.tokenizer.spm import Tokenizer

    ck, _ = chat_runs["chat"]
    out = tmp_path / "hf"
    proc = _python("-m", "src.convert", "--checkpoint", str(ck / "step_00000006"),
                   "--to", "hf", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ours = Tokenizer.load(ck / "step_00000006" / "tokenizer")
    end = ours.encode("<|end|>")
    assert len(end) == 1
    for name in ("config.json", "generation_config.json"):
        eos = json.loads((out / name).read_text())["eos_token_id"]
        assert eos == [ours.eos_id, end[0]], (name, eos)

    hf_tok = AutoTokenizer.from_pretrained(str(out))
    for messages in (MULTI_TURN, MULTI_TURN[1:], *_conversations()[:3]):
        ids = hf_tok.apply_chat_template(messages, tokenize=True)
        if not isinstance(ids, list):  # transformers 5: a BatchEncoding
            ids = ids["input_ids"]
        assert ids == ours.encode(render_conversation(messages))

    model, tok = load(str(out))
    assert tok.has_chat_template and end[0] in tok.eos_token_ids
    prompt = tok.apply_chat_template(MULTI_TURN[:4], add_generation_prompt=True)
    assert prompt == ours.encode(render_conversation(MULTI_TURN[:4]))

    other = ours.encode("sun")[-1]
    for token, stops in ((end[0], True), (other, False)):
        forced = tmp_path / f"forced-{token}"
        shutil.copytree(out, forced)
        _force_next_token(forced, token)
        model, tok = load(str(forced))
        text = generate(model, tok, prompt, max_tokens=6, verbose=False)
        assert (text == "") is stops, text
        hf_model = AutoModelForCausalLM.from_pretrained(str(forced))
        import torch

        ids = torch.tensor([prompt])
        new = hf_model.generate(ids, max_new_tokens=6, do_sample=False)[
            0, len(prompt) :
        ]
        assert new.tolist() == ([end[0]] if stops else [other] * 6), new.tolist()


# ----------------------------------------------------------------- user errors


def _train_args(data: Path, tok: Path, out: Path, *sets: str) -> list[str]:
    base = {"data.train_path": data / "train.bin", "data.val_path": data / "val.bin",
            "data.tokenizer_path": tok, "checkpoint.dir": out / "ck",
            "logging.dir": out / "logs", "training.max_steps": 2}  # fmt: skip
    args = [a for k, v in base.items() for a in ("--set", f"{k}={v}")]
    for s in sets:
        args += ["--set", s]
    return ["-m", "src.train", "--config", "configs/tiny.yaml", *args]


def test_user_errors_exit_2_with_one_line(chat_data, tiny_dataset, tmp_path):
    """loss_on: assistant on plain data, and a damaged, mismatched or missing mask
    file: exit 2, one `error:` line naming the cause, no traceback."""
    tok = chat_data["tokenizer"]
    plain = tiny_dataset["train"].parent
    proc = _python(*_train_args(plain, tok, tmp_path / "a",
                                "training.loss_on=assistant"))  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "loss_on=assistant" in lines[0] and "has none" in lines[0]
    # chat training data, validation data without a mask: refused too
    val = chat_data["plain"] / "val.bin"
    proc = _python(*_train_args(chat_data["dir"], tok, tmp_path / "m",
                                f"data.val_path={val}"))  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "validation file" in proc.stderr and "has none" in proc.stderr

    for damage, says in (
        (lambda p: p.write_bytes(b"NOTAMASK" + p.read_bytes()[8:]), "damaged"),
        (lambda p: p.write_bytes(p.read_bytes()[:-1]), "damaged"),
        (lambda p: p.write_bytes(p.read_bytes()[:-1] + b"\x07"), "0 or 1"),
        (lambda p: p.unlink(), "not found"),
    ):
        data = tmp_path / f"d{says[:3]}{len(list(tmp_path.iterdir()))}"
        shutil.copytree(chat_data["dir"], data)
        damage(data / "train.mask.bin")
        proc = _python(*_train_args(data, tok, tmp_path / "b"))
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert str(data / "train.mask.bin") in lines[0] and says in lines[0]


def test_stats_skips_mask_files(chat_data):
    proc = _python("-m", "src.data", "stats", str(chat_data["dir"]))
    assert proc.returncode == 0, proc.stderr
    files = [json.loads(x)["file"] for x in proc.stdout.splitlines()]
    assert [Path(f).name for f in files] == ["train.bin", "val.bin"]
