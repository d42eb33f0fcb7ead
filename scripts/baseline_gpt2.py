"""The baseline our recipe must beat: a GPT-2-style PyTorch model trained nanoGPT's way.

    python scripts/baseline_gpt2.py --config configs/speedrun.yaml --minutes 25 \
        [--out logs/speedrun/baseline]

Same data (the config's train token file), same tokenizer, same model width/depth/
heads/context/batch as the config, same wall-clock training budget, same machine.
Everything else is nanoGPT's (github.com/karpathy/nanoGPT, written here from its
description, not copied): LayerNorm without bias, learned position embeddings, a
4*d GELU MLP, multi-head attention (no GQA, no RoPE), tied LM head, N(0, 0.02) init
with residual projections scaled by 1/sqrt(2 * layers); AdamW with the settings of
its small-model config (`shakespeare_char`: lr 1e-3, betas (0.9, 0.99), weight decay
0.1 on matrices only, warm-up 100 steps, cosine to lr/10, grad clip 1.0, dropout 0.2).

The step count is fixed after a short calibration so that training ends when the
budget runs out (the cosine schedule then completes), as `src.train` does with
`training.time_budget_minutes`. It writes OUT/model.pt and OUT/results.json;
scripts/speedrun_report.py scores it and our model on the same windows of the same
texts (src.eval.evaluator's windows and byte count).
"""

from __future__ import annotations

import time

PROCESS_START = time.monotonic()  # the budget counts the imports too, as ours does

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# torch brings its own BLAS; the OpenBLAS that `import src` would load globally for
# MLX slows torch's CPU step down by ~13% here (measured), so it is kept out.
os.environ.setdefault("SLM_BLAS", "off")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from src.config import load_config  # noqa: E402
from src.data.loader import TokenLoader  # noqa: E402
from src.tokenizer.spm import Tokenizer  # noqa: E402

CALIBRATION_STEPS = 30  # steps 6..30 are timed to fix the step count
MARGIN = 0.96  # of the time left, as src/budget.py


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln_1 = nn.LayerNorm(d, bias=False)
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.attn_proj = nn.Linear(d, d, bias=False)
        self.ln_2 = nn.LayerNorm(d, bias=False)
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.mlp_proj = nn.Linear(4 * d, d, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)
        q, k, v = (t.view(B, L, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        x = x + self.drop(self.attn_proj(y.transpose(1, 2).reshape(B, L, D)))
        return x + self.drop(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)))))


class GPT(nn.Module):
    def __init__(self, vocab: int, ctx: int, d: int, layers: int, heads: int, dropout):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = (
                    0.02 / math.sqrt(2 * layers)
                    if name.endswith("_proj.weight")
                    else 0.02
                )
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # tied head


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr / 10 + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - lr / 10)


@torch.no_grad()
def loss_sum(model: GPT, windows) -> float:
    """Summed next-token loss (nats) of windows (B, L+1), as our evaluation's
    (src.eval.evaluator.make_eval_fn)."""
    model.eval()
    w = torch.from_numpy(np.asarray(windows)).long()
    logits = model(w[:, :-1])
    return F.cross_entropy(
        logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"
    ).item()


def load(out: str | Path) -> GPT:
    """The model `main` saved in `out` (for scripts/speedrun_report.py)."""
    payload = torch.load(Path(out) / "model.pt", weights_only=True)
    model = GPT(**payload["shape"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def shape_of(cfg, dropout: float = 0.2) -> dict:
    """GPT's constructor arguments for our recipe's config: its sizes."""
    m = cfg.model
    return dict(vocab=m.vocab_size, ctx=m.context_length, d=m.d_model,
                layers=m.n_layers, heads=m.n_heads, dropout=dropout)  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="our recipe's config (sizes, data)")
    p.add_argument("--minutes", type=float, required=True, help="training budget")
    p.add_argument("--out", default="logs/speedrun/baseline", help="folder for results")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()

    cfg = load_config(args.config)
    m, t = cfg.model, cfg.training
    torch.manual_seed(args.seed)
    tok = Tokenizer.load(cfg.data.tokenizer_path)
    loader = TokenLoader(
        cfg.data.train_path, m.context_length, m.vocab_size, tok.sha256
    )
    shape = shape_of(cfg, args.dropout)
    model = GPT(**shape)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99))
    n_params = sum(p.numel() for p in params)
    batch = t.batch_size * t.grad_accum_steps
    print(f"baseline GPT-2 (nanoGPT recipe): {n_params:,} parameters, batch {batch} x "
          f"{m.context_length}, budget {args.minutes:g} min", flush=True)  # fmt: skip

    budget, total, times, log = args.minutes * 60, None, [], []
    start = PROCESS_START
    step = 0
    model.train()
    while total is None or step < total:
        t0 = time.monotonic()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total or 10**9, args.lr, 100)
        w = torch.from_numpy(loader.batch(args.seed, step, batch)).long()
        logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        times.append(time.monotonic() - t0)
        elapsed = time.monotonic() - start
        if total is None and step == CALIBRATION_STEPS:
            per_step = statistics.median(times[5:])
            total = step + int(MARGIN * (budget - elapsed) / per_step)
            print(f"calibrated: {per_step:.3f} s/step -> {total} steps", flush=True)
        if step % 50 == 0 or step == total:
            log.append({"step": step, "loss": loss.item(), "time": elapsed,
                        "tokens": step * batch * m.context_length})  # fmt: skip
            print(
                f"step {step}/{total} loss {loss.item():.4f} {elapsed:.0f}s", flush=True
            )
        if elapsed > budget * 1.05:  # a slower machine than calibrated: stop anyway
            print(f"budget exceeded at step {step}; stopping", flush=True)
            break
    train_time = time.monotonic() - start  # start-up included
    results = {"model": "gpt2-nanogpt", "parameters": n_params, "steps": step,
               "tokens": step * batch * m.context_length, "train_seconds": train_time,
               "hyperparameters": {"lr": args.lr, "betas": [0.9, 0.99], "warmup": 100,
                                   "weight_decay": 0.1, "dropout": args.dropout,
                                   "batch": batch, "grad_clip": 1.0},
               "log": log}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"shape": shape, "state_dict": model.state_dict()}, out / "model.pt")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(
        f"trained {step} steps in {train_time:.0f}s; wrote {out}/model.pt, results.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
