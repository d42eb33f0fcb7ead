"""Training speed: our step vs PyTorch and mlx-lm on the same model, side by side.

    python scripts/benchmark.py [--quick] [--generation] [--out out/benchmark]

For each shape set ((a) a 12.6M-parameter Llama-style model, d 384, 6 layers, 6/2
heads, context 256, vocab 8192; (b) the model and micro-batch of
configs/model_config_small.yaml, timed with grad_accum 1) this times one full
training step (forward, backward, clip, AdamW) of:
  ours           our trainer's step (`src.train.assembly.assemble`, mx.compile), fp32
  ours_eager     the same step with compile=False
  ours_plain     the compiled step without the CPU levers: MLX's fused kernels
                 (SLM_KERNELS=fused) and one stream (training.streams=1)
  torch          src/torch_model.py + torch.optim.AdamW (same hyperparameters,
                 decay mask and schedule), fp32 eager
  torch_compile  the same with torch.compile(model) (skipped, with the reason, if
                 its warm-up fails or takes longer than --compile-timeout)
  mlx_lm         mlx_lm.models.llama.Model trained with our step (mx.compile)
Every MLX implementation runs with the trainer's execution policy
(`src.backend.policy`: a wide evaluation order on the CPU, step buffers kept by the
allocator after a step); an
MLX worker empties that cache after its turn (idle workers holding a step's peak
at once would exhaust memory) and starts the next with an untimed step.
All start from the same weights and batch (the loss of the first step is shown as a
check). Each runs in its own worker process, built and warmed up (compilation
excluded) one after another; then the workers take turns, one step each per round,
so only one framework computes at a time and all see the same machine load.
Reported: median tokens/s, MFU (6 * matmul params + 12 * layers * d * context FLOPs
per token, against the best fp32 2048^3 GEMM of MLX and torch measured here), peak
memory (process RSS above the post-import baseline; for MLX also the allocator
peak), and the ratios ours / torch eager, torch.compile and mlx-lm.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import src  # noqa: E402,F401  (loads the optimized BLAS; must precede mlx)
from src.config import config_from_dict, load_config  # noqa: E402

IMPLS = ["ours", "ours_eager", "ours_plain", "torch", "torch_compile", "mlx_lm"]
SHAPE_A = dict(
    vocab_size=8192, d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, d_ff=1024,
    context_length=256,
)  # fmt: skip


SHAPE_TINY = dict(
    vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
    context_length=32,
)  # fmt: skip


def shape_sets() -> dict[str, tuple[str, dict]]:
    small = load_config(ROOT / "configs" / "model_config_small.yaml").to_dict()
    return {
        "a": ("12.6M Llama-style model", {"model": SHAPE_A, "training": {}}),
        "b": ("model_config_small", {k: small[k] for k in ("model", "training")}),
        "tiny": (
            "tiny smoke test",
            {"model": SHAPE_TINY, "training": {"batch_size": 4}},
        ),
    }


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- worker side


def mlx_worker(impl: str, cfg, init: str):
    import mlx.core as mx

    from src.backend import blas, policy
    from src.train.assembly import assemble

    policy.configure_process()
    model = None
    if impl == "mlx_lm":
        from mlx_lm.models import llama

        m = cfg.model
        model = llama.Model(llama.ModelArgs(
            model_type="llama", hidden_size=m.d_model, num_hidden_layers=m.n_layers,
            intermediate_size=m.ffn_dim, num_attention_heads=m.n_heads,
            num_key_value_heads=m.kv_heads, head_dim=m.head_dim,
            rms_norm_eps=m.norm_eps, vocab_size=m.vocab_size, rope_theta=m.rope_theta,
            tie_word_embeddings=m.tie_embeddings,
        ))  # fmt: skip
    elif impl == "ours_plain":
        from src.backend import kernels

        kernels.set_kernel_set("fused")
        cfg.training.streams = 1
    base = rss()
    parts = assemble(cfg, model=model, compile=impl != "ours_eager")
    model, opt, step = parts.model, parts.optimizer, parts.train_step
    data = mx.load(init)
    batch = data.pop("__batch__")[None]  # (accum 1, B, L+1)
    model.load_weights(list(data.items()), strict=True)
    mx.eval(model.state, opt.state, batch)

    def one() -> float:
        loss, _, _ = step(batch)
        mx.eval(model.state, opt.state, loss)
        policy.keep_step_buffers()  # as the trainer does after its first step
        return loss.item()

    def gemm() -> float:
        a, b = mx.random.normal((2048, 2048)), mx.random.normal((2048, 2048))
        mx.eval(a, b)
        blas.set_threads(os.cpu_count() or 1)  # the ceiling uses every core
        gflops = best_gflops(lambda: mx.eval(a @ b))
        policy.streams(cfg.training.streams)  # back to a thread per stream
        return gflops

    return one, gemm, base, mx.get_peak_memory, mx.clear_cache


def torch_worker(impl: str, cfg, init: str):
    import numpy as np
    import torch
    import torch.nn.functional as F

    from src.convert import torch_model

    t = cfg.training
    model = torch_model.Model(cfg.model)
    base = rss()
    data = dict(np.load(init))
    batch = torch.from_numpy(data.pop("__batch__").astype(np.int64))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in data.items()})
    decay = lambda n, p: p.ndim >= 2 and (t.decay_embeddings or "embed_tokens" not in n)  # noqa: E731
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if decay(n, p)], "weight_decay": t.weight_decay},
        {"params": [p for n, p in named if not decay(n, p)], "weight_decay": 0.0},
    ]  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.beta1, t.beta2), eps=t.eps)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(t, s))
    forward = torch.compile(model) if impl == "torch_compile" else model

    def one() -> float:
        logits = forward(batch[:, :-1]).float()
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or math.inf)
        opt.step()
        sched.step()
        return loss.item()

    def gemm() -> float:
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        return best_gflops(lambda: a @ b)

    return one, gemm, base, lambda: None, None


def lr_factor(t, step: int) -> float:
    """src.train.schedule.lr_schedule divided by the peak learning rate."""
    if step < t.warmup_steps:
        return (step + 1) / max(t.warmup_steps, 1)
    progress = min(max((step - t.warmup_steps) / max(t.max_steps - t.warmup_steps, 1), 0), 1)  # fmt: skip
    return t.min_lr_ratio + 0.5 * (1 - t.min_lr_ratio) * (1 + math.cos(math.pi * progress))  # fmt: skip


def best_gflops(matmul, n: int = 2048, reps: int = 5) -> float:
    matmul()
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        matmul()
        times.append(time.perf_counter() - tic)
    return 2 * n**3 / min(times) / 1e9


def worker(impl: str, spec: str, init: str, warmup: int) -> int:
    """Build, warm up, say ready; then answer one JSON command per line on stdin."""
    reply_to = os.fdopen(os.dup(1), "w")
    sys.stdout = sys.stderr  # only protocol lines go to the real stdout
    cfg = config_from_dict(json.loads(spec))
    build = torch_worker if impl.startswith("torch") else mlx_worker
    one, gemm, base, mlx_peak, release = build(impl, cfg, init)
    tic = time.perf_counter()
    first_loss = [one() for _ in range(warmup)][0]
    if release is not None:
        release()
    send = lambda msg: print(json.dumps(msg), file=reply_to, flush=True)  # noqa: E731
    send({"ready": True, "warmup_s": time.perf_counter() - tic, "loss1": first_loss})
    for line in sys.stdin:
        cmd = json.loads(line)
        if "gemm" in cmd:
            send({"gflops": gemm()})
        elif "steps" in cmd:  # idle MLX workers hold no cached buffers (docstring)
            if release is not None:
                one()  # untimed: fills the allocator cache again
            times = []
            for _ in range(cmd["steps"]):
                tic = time.perf_counter()
                one()
                times.append(time.perf_counter() - tic)
            if release is not None:
                release()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            send({"times": times, "rss_peak": peak - base, "mlx_peak": mlx_peak()})
        else:
            break
    return 0


# ---------------------------------------------------------------- parent side


class Worker:
    def __init__(self, impl, spec, init, warmup, timeout):
        cmd = [sys.executable, __file__, "--worker", impl, spec, init, str(warmup)]
        # torch keeps its own BLAS: no OpenBLAS preloaded over it (src.backend.blas)
        env = {**os.environ, **({"SLM_BLAS": "off"} if "torch" in impl else {})}
        self.impl, self.timeout = impl, timeout
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip

    def ask(self, cmd: dict | None = None, timeout: float | None = None) -> dict:
        if cmd is not None:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout or self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise RuntimeError(
                "timed out" if not ready else f"exited with {self.proc.wait()}"
            )
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def flops_per_token(m) -> float:
    """6 * matmul parameters (the LM head counted, the embedding lookup not) plus
    12 * layers * d * context for attention scores (the PaLM convention)."""
    d, hd = m.d_model, m.head_dim
    attn = d * hd * (m.n_heads + 2 * m.kv_heads) + m.n_heads * hd * d
    matmul = m.n_layers * (attn + 3 * d * m.ffn_dim) + m.vocab_size * d
    return 6 * matmul + 12 * m.n_layers * d * m.context_length


def bench_shape(spec: dict, impls: list[str], args, tmp: Path) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from src.model.transformer import Model

    spec["training"] = {**spec["training"], "grad_accum_steps": 1, "precision": "fp32"}
    cfg = config_from_dict(spec)
    m, B = cfg.model, cfg.training.batch_size
    mx.random.seed(0)
    init = {k: v for k, v in tree_flatten(Model(m).parameters())}
    init["__batch__"] = mx.random.randint(0, m.vocab_size, (B, m.context_length + 1))
    path = str(tmp / f"init_{m.d_model}_{m.n_layers}.npz")
    mx.savez(path, **init)
    spec_json = json.dumps(spec)
    res = {"params": m.num_params(), "batch": B, "context": m.context_length}
    res.update(tokens_per_step=B * m.context_length, flops_per_token=flops_per_token(m))
    rows, live = {}, {}
    for impl in impls:  # built and warmed up one at a time (mx.compile runs g++)
        timeout = args.compile_timeout if impl == "torch_compile" else 1800
        w = Worker(impl, spec_json, path, args.warmup, timeout)
        try:
            rows[impl] = w.ask()
            live[impl] = w
            print(f"  {impl}: warm-up {rows[impl]['warmup_s']:.1f} s", flush=True)
        except RuntimeError as e:
            why = f"warm-up {e}" + (
                f" (limit {timeout} s)" if "timed" in str(e) else ""
            )
            rows[impl] = {"skipped": why}
            print(f"  {impl}: skipped, {why}", flush=True)
    gemm = {k: live[w].ask({"gemm": 1})["gflops"] for k, w in (("mlx", "ours"), ("torch", "torch")) if w in live}  # fmt: skip
    res["gemm_gflops"], ceiling = gemm, max(gemm.values(), default=math.nan)
    times = {impl: [] for impl in live}
    for r in range(args.rounds):  # round-robin: one framework computes at a time
        for impl, w in live.items():
            out = w.ask({"steps": args.steps})
            times[impl] += out["times"]
            rows[impl].update(rss_peak=out["rss_peak"], mlx_peak=out["mlx_peak"])
        print(f"  round {r + 1}/{args.rounds} done", flush=True)
    for impl, w in live.items():
        w.proc.stdin.close()
        w.close()
        med = statistics.median(times[impl])
        tok_s = res["tokens_per_step"] / med
        mfu = tok_s * res["flops_per_token"] / (ceiling * 1e9)
        rows[impl].update(step_s=med, tok_s=tok_s, mfu=mfu, n=len(times[impl]))
    res["results"] = rows
    tok = lambda k: rows.get(k, {}).get("tok_s", math.nan)  # noqa: E731
    res["ratios"] = {f"ours/{k}": tok("ours") / tok(k) for k in IMPLS[2:]}
    return res


def fmt_mib(n) -> str:
    return "—" if n is None else f"{n / 2**20:,.0f} MiB"


def table(name: str, desc: str, res: dict) -> str:
    g = res["gemm_gflops"]
    lines = [
        f"**({name}) {desc}**: {res['params'] / 1e6:.1f}M params, batch "
        f"{res['batch']} × context {res['context']} (grad_accum 1), fp32 on CPU; "
        f"GEMM ceiling (2048³ fp32, best of MLX / torch): "
        + " / ".join(f"{v:.0f}" for v in g.values())
        + " GFLOP/s",
        "",
        "| implementation | tok/s (median) | step | MFU | peak RSS Δ | MLX peak | loss step 1 | warm-up |",  # fmt: skip
        "|---|---|---|---|---|---|---|---|",
    ]
    for impl, r in res["results"].items():
        if "skipped" in r:
            lines.append(f"| {impl} | skipped: {r['skipped']} | | | | | | |")
            continue
        lines.append(
            f"| {impl} | {r['tok_s']:,.0f} | {r['step_s']:.2f} s (n={r['n']}) "
            f"| {r['mfu']:.0%} | {fmt_mib(r['rss_peak'])} | {fmt_mib(r['mlx_peak'])} "
            f"| {r['loss1']:.4f} | {r['warmup_s']:.0f} s |"
        )
    ratios = ", ".join(f"{k} **{v:.2f}×**" for k, v in res["ratios"].items())
    return "\n".join(lines + ["", f"Ratios (tokens/s): {ratios}", ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="shape set (a), fewer steps")
    p.add_argument("--generation", action="store_true", help="+ bench_generate.py")
    p.add_argument("--out", default="out/benchmark", help="writes OUT.json, OUT.md")
    p.add_argument("--shapes", nargs="+", choices=["a", "b", "tiny"],
                   help="shape sets (default a b; --quick: a; tiny: a smoke test)")  # fmt: skip
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=IMPLS)
    p.add_argument("--rounds", type=int, help="timed rounds (default 5; quick 3)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per turn")
    p.add_argument("--warmup", type=int, help="untimed steps per worker (2; quick 1)")
    p.add_argument("--compile-timeout", type=float, help="torch.compile warm-up limit")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        impl, spec, init, warmup = args.worker
        return worker(impl, spec, init, int(warmup))
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.warmup = args.warmup or (1 if args.quick else 2)
    args.compile_timeout = args.compile_timeout or (150 if args.quick else 300)
    shapes = args.shapes or (["a"] if args.quick else ["a", "b"])
    versions = {k: version(k) for k in ("mlx", "mlx-lm", "torch")}
    report = {"command": " ".join(["python scripts/benchmark.py", *(argv or sys.argv[1:])])}  # fmt: skip
    report.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    report.update(cpus=os.cpu_count(), load_start=os.getloadavg(), versions=versions)
    md = [
        f"Training step benchmark, {report['date']}, CPU ({os.cpu_count()} cores), "
        f"load average at start {report['load_start'][0]:.2f}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"`{report['command']}`; median of {args.rounds} rounds × {args.steps} "
        f"step(s), {args.warmup} warm-up steps excluded.",
        "",
    ]
    all_shapes = shape_sets()
    with tempfile.TemporaryDirectory() as tmp:
        for name in shapes:
            desc, spec = all_shapes[name]
            print(f"shape set ({name}) {desc}", flush=True)
            report[name] = bench_shape(spec, args.impls, args, Path(tmp))
            md.append(table(name, desc, report[name] | {"desc": desc}))
    report["load_end"] = os.getloadavg()
    if args.generation:
        gen = ["--configs", "tiny", "--repeats", "1"] if args.quick else []
        out = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "bench_generate.py"), *gen],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        report["generation"] = out
        md += ["Generation (`scripts/bench_generate.py`):", "", "```", out.strip(), "```", ""]  # fmt: skip
    text = "\n".join(md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
