"""MatFormer nested FFN (issue 17): the narrow MLP is a smaller MLP, both training
modes (sample: one width per step from (seed, step); sum: the mean over widths)
keep compiled == eager and exact resume, validation logs every width, and the
--ffn-fraction of src.eval, src.inference and src.convert (an exported width is a
plain smaller model that computes what the MLX model computes at that width)."""

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from commands import run, user_error
from mlx.utils import tree_flatten

from src.checkpoint import store
from src.checkpoint.contents import build_meta
from src.config import config_from_dict
from src.convert import cli as convert
from src.model import matformer
from src.model.loss import mean_loss
from src.model.transformer import MLP, Model
from src.tokenizer.spm import Tokenizer
from src.train.assembly import assemble
from src.train.optim import build_optimizer
from src.train.step import make_train_step

try:
    import torch

    from src.convert import torch_model
except ImportError:  # the optional `torch` extra
    torch = None
try:
    import transformers
except ImportError:
    transformers = None

WIDTHS = [0.25, 0.5, 1.0]
TOL = 1e-4  # fp32 logits, max absolute difference


def max_diff(a, b) -> str:
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return f"max |diff| {d.max():.3g}, mean {d.mean():.3g}"


# ------------------------------------------------------------- the model


@pytest.mark.parametrize("mlp", ["swiglu", "relu2"])
def test_narrow_mlp_equals_a_smaller_mlp_with_sliced_weights(tiny_config, mlp):
    cfg = tiny_config(mlp=mlp, d_ff=96).model
    mx.random.seed(0)
    big = MLP(cfg)
    x = mx.random.normal((2, 5, cfg.d_model))
    full = big(x)
    for k in (1, 24, 48):
        small = MLP(tiny_config(mlp=mlp, d_ff=k).model)
        flat = dict(tree_flatten(big.parameters()))
        sliced = {n: w[:k] if "down" not in n else w[:, :k] for n, w in flat.items()}
        small.load_weights(list(sliced.items()), strict=True)
        big.width = k
        narrow = big(x)
        big.width = None
        assert mx.allclose(narrow, small(x), atol=1e-6).item(), max_diff(
            narrow, small(x)
        )
        assert not mx.allclose(narrow, full, atol=1e-3).item()  # a real difference


def test_narrowed_model_computes_the_width(tiny_config):
    """`narrowed` (what eval/inference/export use) equals the in-place width of
    training's validation, and is the plain model of that width."""
    cfg = tiny_config(matformer_widths=WIDTHS, init_std=0.15).model
    mx.random.seed(1)
    model = Model(cfg)
    ids = mx.array([[3, 14, 15, 92, 65, 35, 89, 79]])
    full = model(ids)
    for f in WIDTHS[:-1]:
        small = matformer.narrowed(model, f)
        k = matformer.neurons(cfg.ffn_dim, f)
        assert small.config.ffn_dim == k and small.config.matformer_widths == []
        assert small.num_params() == small.config.num_params() < model.num_params()
        with matformer.use_width(model, f):
            at = model(ids)
        assert mx.allclose(small(ids), at, atol=1e-5).item(), max_diff(small(ids), at)
        assert not mx.allclose(at, full, atol=1e-3).item()
    assert all(layer.mlp.width is None for layer in model.model.layers)
    assert matformer.narrowed(model, 1.0) is model


# -------------------------------------------------------------- training


def test_sample_width_is_a_function_of_seed_and_step():
    draws = [matformer.sample_width(WIDTHS, 1337, s) for s in range(7000)]
    assert draws == [matformer.sample_width(WIDTHS, 1337, s) for s in range(7000)]
    other = [matformer.sample_width(WIDTHS, 1338, s) for s in range(7000)]
    assert other != draws
    counts = Counter(draws)
    for w, p in zip(WIDTHS, matformer.sample_weights(WIDTHS)):
        assert abs(counts[w] / len(draws) - p) < 0.02, (w, counts)
    assert matformer.sample_weights(WIDTHS) == [1 / 7, 2 / 7, 4 / 7]


def test_assembly_gives_each_step_its_widths_step(tiny_config):
    cfg = tiny_config(matformer_widths=WIDTHS)
    parts = assemble(cfg, compile=False)
    assert sorted(parts.width_steps) == WIDTHS
    assert parts.width_steps[1.0] == (parts.train_step, parts.masked_step)
    assert sorted(parts.width_evals) == WIDTHS[:-1]
    seed = cfg.training.seed
    for step in range(30):
        plain, masked = parts.width_steps[matformer.sample_width(WIDTHS, seed, step)]
        assert parts.step_for(step) is plain
        assert parts.step_for(step, masked=True) is masked
    summed = assemble(tiny_config({"matformer_loss": "sum"}, matformer_widths=WIDTHS))
    assert summed.width_steps == {} and summed.step_for(5) is summed.train_step
    plain = assemble(tiny_config(), compile=False)
    assert plain.width_steps == {} and plain.width_evals == {}


def _batches(n, accum=2, seed=0):
    rng = np.random.default_rng(seed)
    data = [mx.array(rng.integers(0, 61, (accum, 4, 17)), dtype=mx.int32)
            for _ in range(n)]  # fmt: skip
    masks = [mx.array(rng.random((accum, 4, 17)) < 0.5) for _ in range(n)]
    return data, masks


def _train(tiny_config, compile, widths, masked, data, masks, **model):
    """Losses and final weights of 4 steps (accum 2) at `widths`."""
    model = {"dropout": 0.1, **model}
    cfg = tiny_config(dict(batch_size=4, grad_accum_steps=2, warmup_steps=2,
                           max_steps=10, learning_rate=3e-3),
                      vocab_size=61, context_length=16, matformer_widths=WIDTHS,
                      **model)  # fmt: skip
    mx.random.seed(0)
    model = Model(cfg.model)
    opt = build_optimizer(model, cfg.training)
    step = make_train_step(model, opt, cfg.training, compile=compile, masked=masked,
                           widths=widths)  # fmt: skip
    losses = []
    for i, (b, m) in enumerate(zip(data, masks)):
        mx.random.seed(7 + i)
        loss, _, ok = step(b, m) if masked else step(b)
        mx.eval(model.state, opt.state, loss)
        assert ok.item()
        losses.append(loss.item())
    return losses, dict(tree_flatten(model.parameters()))


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "chat-masked"])
@pytest.mark.parametrize("widths", [tuple(WIDTHS), (0.25,)], ids=["sum", "sample"])
def test_compiled_step_equals_eager(tiny_config, widths, masked):
    data, masks = _batches(4)
    l1, w1 = _train(tiny_config, True, widths, masked, data, masks)
    l2, w2 = _train(tiny_config, False, widths, masked, data, masks)
    assert np.allclose(l1, l2, rtol=1e-5, atol=1e-5), (l1, l2)
    for k in w1:
        assert mx.abs(w1[k] - w2[k]).max().item() < 1e-5, (
            f"{k}: {max_diff(w1[k], w2[k])}"
        )
    whole, _ = _train(tiny_config, False, (None,), masked, data, masks)
    assert l1[0] != whole[0]  # the widths change the loss


@pytest.mark.parametrize("widths", [tuple(WIDTHS), (0.25,)], ids=["sum", "sample"])
def test_gradient_checkpointing_recomputes_at_the_width(tiny_config, widths):
    """A checkpointed block recomputes its forward in the backward pass: at the
    width it ran at, so the step is the one without checkpointing."""
    data, masks = _batches(3)
    runs = [_train(tiny_config, True, widths, False, data, masks, dropout=0.0,
                   gradient_checkpointing=c) for c in (False, True)]  # fmt: skip
    (l1, w1), (l2, w2) = runs
    assert np.allclose(l1, l2, rtol=1e-5, atol=1e-5), (l1, l2)
    for k in w1:
        assert mx.abs(w1[k] - w2[k]).max().item() < 1e-5, (
            f"{k}: {max_diff(w1[k], w2[k])}"
        )


def test_sum_loss_is_the_mean_over_widths(tiny_config):
    """sum mode: the step's loss is the mean of the whole-batch losses at each
    width (accumulation: the mean over micro-batches of that)."""
    cfg = tiny_config(dict(batch_size=4, grad_accum_steps=2), vocab_size=61,
                      context_length=16, matformer_widths=WIDTHS)  # fmt: skip
    mx.random.seed(0)
    model = Model(cfg.model)
    (batch,), _ = _batches(1)
    expect = []
    for w in WIDTHS:
        with matformer.use_width(model, w):
            expect.append(sum(mean_loss(model, batch[i]).item() for i in range(2)) / 2)
    opt = build_optimizer(model, cfg.training)
    step = make_train_step(model, opt, cfg.training, compile=True, widths=tuple(WIDTHS))
    loss, _, _ = step(batch)
    assert math.isclose(loss.item(), sum(expect) / 3, rel_tol=1e-5), (loss, expect)
    assert len(set(expect)) == 3


# --------------------------------------------------- a run, through the CLI

RUN = dict(
    model__matformer_widths="[0.25,0.5,1.0]",
    training__max_steps=20,
    eval__interval=10,
    checkpoint__interval=10,
    checkpoint__keep_last=5,
    eval__sample_tokens=0,
    logging__interval=5,
)


def metrics(log_dir: Path, event: str) -> list[dict]:
    rows = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == event]


@pytest.fixture(scope="module")
def mf_run(train_tiny, tmp_path_factory):
    """A 20-step sample-mode MatFormer run of configs/tiny.yaml: (its output
    folder, checkpoint folder, log folder)."""
    out = tmp_path_factory.mktemp("matformer")
    ck, logs = train_tiny(out, **RUN)
    return out, ck, logs


def test_validation_logs_every_width(mf_run, tiny_dataset):
    out, ck, logs = mf_run
    evals = metrics(logs, "eval")
    assert [e["step"] for e in evals] == [10, 20]
    for e in evals:
        for key in ("val_loss@0.25", "val_bpb@0.25", "val_loss@0.5", "val_bpb@0.5"):
            assert math.isfinite(e[key]) and e[key] > 0, (key, e)
        assert e["val_loss@0.25"] != e["val_loss"]
    assert "val bpb by FFN width: 0.25 " in (logs / "train.log").read_text()
    # the checkpoint's metric is the whole model's
    meta = json.loads((ck / "step_00000020" / "meta.json").read_text())
    assert meta["val_loss"] == evals[1]["val_loss"]
    # src.eval at a width scores what validation logged at it
    proc = run("eval", "--checkpoint", ck / "step_00000020", "--data",
               tiny_dataset["val"], "--max-tokens", 4096, "--ffn-fraction", 0.5,
               "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["ffn_fraction"] == 0.5 and got["ffn_dim"] == 128
    assert math.isclose(got["loss"], evals[1]["val_loss@0.5"], rel_tol=1e-5), got


def test_sample_mode_resume_is_exact(mf_run, train_tiny, tmp_path):
    """Resuming at step 10 repeats the uninterrupted run's steps 11-20 and its
    validation at every width, bit for bit (CPU)."""
    out, ck, logs = mf_run
    again = tmp_path / "again"
    shutil.copytree(out, again, symlinks=True)
    _, logs2 = train_tiny(again, "--resume", again / "ck" / "tiny" / "step_00000010",
                          "--rewind", **RUN)  # fmt: skip
    train = {r["step"]: r["loss"] for r in metrics(logs, "train")}
    resumed = {r["step"]: r["loss"] for r in metrics(logs2, "train")}
    assert sorted(resumed) == list(range(1, 21)) and resumed == train
    strip = [{k: v for k, v in e.items() if k != "time"} for e in metrics(logs, "eval")]
    assert [{k: v for k, v in e.items() if k != "time"}
            for e in metrics(logs2, "eval")] == strip  # fmt: skip


# ------------------------------------------------------ --ffn-fraction CLIs


def _checkpoint(run_dir, tiny_config, tokenizer_dir, **model) -> Path:
    """A checkpoint of a random tiny model (weights large enough for the FFN to
    matter), with the tiny dataset's tokenizer."""
    cfg = tiny_config(vocab_size=512, d_model=64, context_length=64, init_std=0.15,
                      **model)  # fmt: skip
    mx.random.seed(0)
    weights = dict(tree_flatten(Model(cfg.model).parameters()))
    sha = Tokenizer.load(tokenizer_dir).sha256
    return store.save_checkpoint(run_dir, 3, weights, {}, build_meta(cfg, sha),
                                 tokenizer_dir)  # fmt: skip


@pytest.fixture(scope="module")
def plain_checkpoint(tiny_config, tiny_dataset, tmp_path_factory):
    """A checkpoint of a model not trained as a MatFormer."""
    return _checkpoint(tmp_path_factory.mktemp("plain"), tiny_config,
                       tiny_dataset["tokenizer"])  # fmt: skip


def test_inference_runs_a_width(mf_run):
    _, ck, _ = mf_run
    proc = run("inference", "--checkpoint", ck, "--prompt", "Once upon a time",
               "--ffn-fraction", 0.25, "--max-tokens", 8, "--seed", 1)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Once upon a time")
    assert "FFN width 0.25: 64 neurons per layer" in proc.stderr
    chat = run("inference", "--checkpoint", ck, "--interactive", "--no-history",
               "--ffn-fraction", 0.5, "--max-tokens", 6, "--seed", 1,
               input="Hello\n/quit\n")  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert "FFN width 0.5: 128 neurons per layer" in chat.stderr


def test_a_width_not_trained_is_refused(
    mf_run, plain_checkpoint, tiny_dataset, tmp_path
):
    ck = mf_run[1] / "step_00000020"
    val = tiny_dataset["val"]
    user_error(
        run("eval", "--checkpoint", ck, "--data", val, "--ffn-fraction", 0.3),
        "--ffn-fraction 0.3", "model.matformer_widths: 0.25, 0.5, 1",
    )  # fmt: skip
    user_error(
        run("inference", "--checkpoint", plain_checkpoint, "--prompt", "Hi",
            "--ffn-fraction", 0.5),
        "not trained as a MatFormer", "model.matformer_widths",
    )  # fmt: skip
    user_error(
        run("eval", "--checkpoint", plain_checkpoint, "--data", val,
            "--ffn-fraction", 0.5),
        "not trained as a MatFormer", "model.matformer_widths",
    )  # fmt: skip
    for to, out in (("torch", tmp_path / "m.pt"), ("hf", tmp_path / "hf")):
        user_error(
            run("convert", "--checkpoint", ck, "--to", to, "--out", out,
                "--ffn-fraction", 0.3),
            "--ffn-fraction 0.3", "model.matformer_widths",
        )  # fmt: skip
        user_error(
            run("convert", "--checkpoint", plain_checkpoint, "--to", to, "--out",
                out, "--ffn-fraction", 0.5),
            "not trained as a MatFormer",
        )  # fmt: skip
        assert not out.exists()


@pytest.mark.skipif(
    torch is None or transformers is None,
    reason="torch and transformers not installed: pip install -e '.[torch]'",
)
def test_exported_width_is_a_plain_model_with_the_same_logits(
    tiny_config, tiny_dataset, tmp_path
):
    """--to torch / --to hf --ffn-fraction 0.5: a plain model with d_ff = 128 whose
    logits (PyTorch reference, transformers Llama) equal the MLX model's at 0.5."""
    from transformers import AutoModelForCausalLM

    from src.checkpoint.contents import load_model

    path = _checkpoint(tmp_path / "run", tiny_config, tiny_dataset["tokenizer"],
                       matformer_widths=WIDTHS)  # fmt: skip
    model, tok, _ = load_model(path)
    ids = tok.encode("Once upon a time, a little dog found a red ball in the park.")
    with matformer.use_width(model, 0.5):
        ours = np.array(model(mx.array([ids])))
    whole = np.array(model(mx.array([ids])))
    assert np.abs(ours - whole).max() > 100 * TOL  # the width matters here

    pt, hf = tmp_path / "half.pt", tmp_path / "half-hf"
    args = ["--checkpoint", path, "--ffn-fraction", "0.5"]
    assert convert.main([*map(str, args), "--to", "torch", "--out", str(pt)]) == 0
    proc = run("convert", *args, "--to", "hf", "--out", hf)  # transformers: slow
    assert proc.returncode == 0 and f"wrote {hf}" in proc.stdout, proc.stderr
    ref = torch_model.load(pt)  # strict
    assert ref.config.ffn_dim == 128 and ref.config.matformer_widths == []
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).float().numpy()
    assert np.abs(ours - theirs).max() <= TOL, max_diff(ours, theirs)

    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "llama" and config["intermediate_size"] == 128
    stash = config["mlx_slm_trainer"]["config"]
    assert stash["model"]["matformer_widths"] == [] and stash["model"]["d_ff"] == 128
    assert stash["run_name"].endswith("-ffn0.5")
    hf_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits.numpy()
    assert np.abs(ours - theirs).max() <= TOL, max_diff(ours, theirs)
    assert config_from_dict(stash).model.num_params() == sum(
        p.numel() for p in hf_model.parameters()
    )
