"""Training speed: our step vs PyTorch and mlx-lm on the same model, side by side.

    python scripts/benchmark.py [--quick] [--generation] [--breakdown]
                                [--out out/benchmark]
    python scripts/benchmark.py --shapes medium --impls ours torch
                                --precision bf16 --torch-device cuda  # on a GPU

Numbers from different machines are never comparable blind: the report opens
with the machine (`src.backend.machine`: CPU model, physical/logical cores, the
ISA extensions that matter, the BLAS and the kernels it picked, MLX's version and
backend, torch's BLAS, and the 2048³ fp32 GEMM ceiling measured here), and every
table header names the CPU (or, where one computes, the GPU).

For each shape set ((a) a 12.6M-parameter Llama-style model, d 384, 6 layers, 6/2
heads, context 256, vocab 8192; (b) the model and micro-batch of
configs/model_config_small.yaml, timed with grad_accum 1; only when asked for:
`speedrun`, the same of configs/speedrun.yaml, and `medium`, the ~124M model of
configs/medium.yaml at batch 8 x 1024, for a GPU) this times one full training
step (forward, backward, clip, AdamW) in --precision (fp32; bf16: bf16 compute,
fp32 master weights) of:
  ours           our trainer's step (`src.train.assembly.assemble`, mx.compile)
  ours_eager     the same step with compile=False
  ours_plain     the compiled step without the CPU levers: MLX's fused kernels
                 (SLM_KERNELS=fused) and one stream (training.streams=1)
  torch          src/convert/torch_model.py + torch.optim.AdamW (same
                 hyperparameters, decay mask and schedule), eager, on
                 --torch-device (bf16: under torch.autocast); scripts/bench_torch.py
  torch_compile  the same with torch.compile(model) (skipped, with the reason, if
                 its warm-up fails or takes longer than --compile-timeout)
  mlx_lm         mlx_lm.models.llama.Model trained with our step (mx.compile)
  ours_muon      our compiled step with training.optimizer=muon (Muon's
                 Newton-Schulz on the block matrices, AdamW on the rest); only
                 when asked for (`--impls ours ours_muon`): the report adds
                 Muon's step time over AdamW's (ours_muon / ours)
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
per token, against the best n^3 GEMM of MLX and torch measured here, each on its
device and in the compute dtype; n = 2048 on the CPU (1024 in bf16), 8192 on a
GPU, or --gemm-size), the devices (MLX's default, torch's --torch-device), peak
memory (process RSS above the post-import baseline; for MLX also the allocator
peak), and the ratios ours / torch eager, torch.compile and mlx-lm.

`--breakdown` times, instead of the round-robin, where one step's time goes, for
ours (and ours_plain) and torch: each component alone at the step's shapes, over
all layers, forward and backward where the step differentiates it, on fresh
random inputs: the GEMMs (Q/K/V/O and MLP projections, LM head), the attention
core, the elementwise work and norms (norms, RoPE, activation × up, residual adds,
embedding lookup), the cross-entropy over the vocabulary logits, and the
optimizer (clipping + AdamW over all parameters). Ours runs them with the step's
kernel set (`src.backend.kernels`), streams and mx.compile; torch eagerly, as its
step does. Reported: each component's median ms and share of their sum, and the
whole step measured in the same worker, so sum / step says how much the parts
explain (what they leave out: reshapes and transposes, the gradient sums across
streams, and the overlap of the step's scheduling).
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
from bench_common import best_gflops, gemm_size, projections, rss, timed  # noqa: E402
from bench_torch import DEVICES, cuda_problem, torch_about, torch_worker  # noqa: E402

import src  # noqa: E402,F401  (loads the optimized BLAS; must precede mlx)
from src import cli  # noqa: E402
from src.backend.machine import describe as describe_machine  # noqa: E402
from src.backend.machine import short as machine_short  # noqa: E402
from src.backend.machine import summary as machine_summary  # noqa: E402
from src.config import config_from_dict, load_config  # noqa: E402
from src.errors import UsageError, UserError  # noqa: E402
from src.files import atomic_file, check_writable  # noqa: E402

IMPLS = ["ours", "ours_eager", "ours_plain", "torch", "torch_compile", "mlx_lm"]
EXTRA_IMPLS = ["ours_muon"]  # run only when named in --impls
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
    speedrun = load_config(ROOT / "configs" / "speedrun.yaml").to_dict()
    medium = load_config(ROOT / "configs" / "medium.yaml").to_dict()
    return {
        "a": ("12.6M Llama-style model", {"model": SHAPE_A, "training": {}}),
        "b": ("model_config_small", {k: small[k] for k in ("model", "training")}),
        "speedrun": (
            "configs/speedrun.yaml",
            {k: speedrun[k] for k in ("model", "training")},
        ),
        "tiny": (
            "tiny smoke test",
            {"model": SHAPE_TINY, "training": {"batch_size": 4}},
        ),
        "medium": (  # for a GPU: minutes per step on a CPU
            "configs/medium.yaml (~124M), batch 8",
            {
                "model": medium["model"],
                "training": {**medium["training"], "batch_size": 8},
            },  # fmt: skip
        ),
    }


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
    elif impl == "ours_muon":
        cfg.training.optimizer = "muon"
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

    def gemm(n: int) -> float:
        """The ceiling: an n³ GEMM in the compute dtype on the default device."""
        dtype = policy.compute_dtype(cfg.training.precision)
        a, b = (mx.random.normal((n, n)).astype(dtype) for _ in range(2))
        mx.eval(a, b)
        if policy.on_gpu():
            return best_gflops(lambda: mx.eval(a @ b), n)
        blas.set_threads(os.cpu_count() or 1)  # the ceiling uses every core
        gflops = best_gflops(lambda: mx.eval(a @ b), n)
        policy.streams(cfg.training.streams)  # back to a thread per stream
        return gflops

    def breakdown(repeats: int) -> dict:
        step_ms = timed(one, repeats)  # first: the warm-up left the step's buffers
        comps = {k: timed(f, repeats, lambda f=f: f(1)) for k, f in mlx_components(cfg, parts)}  # fmt: skip
        return {"components": comps, "step": step_ms}

    return one, gemm, base, mx.get_peak_memory, mx.clear_cache, breakdown


# ------------------------------------------------ breakdown (worker side)
# Each component of one training step, alone, at the step's shapes: a function
# that does that part of the step's work once (forward and backward where the
# step differentiates it), on fresh random inputs of the step's shapes, over all
# layers. Ours runs on the step's streams with the step's kernel set
# (src.backend.kernels) and mx.compile, as the step does; torch runs eagerly as the
# torch step does. Not timed: reshapes and transposes between the parts, the
# gradient sums across streams, and the step's scheduling overlap.

COMPONENTS = {
    "gemm": "GEMMs: Q/K/V/O and MLP projections, LM head (fwd + bwd)",
    "attention": "attention core: scores, mask, softmax, weighted sum (fwd + bwd)",
    "elementwise": "elementwise and norms: norms, RoPE, activation × up, residual adds, embedding (fwd + bwd)",  # fmt: skip
    "cross_entropy": "cross-entropy over the vocabulary logits (fwd + bwd)",
    "optimizer": "optimizer: gradient clipping + AdamW over all parameters",
}


def gemm_flop(m, tokens: int) -> int:
    """FLOPs of one step's GEMMs: forward + two backward products per projection."""
    per_layer = sum(i * o for i, o in projections(m))
    return 6 * tokens * (m.n_layers * per_layer + m.d_model * m.vocab_size)


def mlx_components(cfg, parts):
    """(name, run) pairs: run() computes one step's component (and evaluates it)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.optimizers import clip_grad_norm
    from mlx.utils import tree_flatten, tree_map, tree_unflatten

    from src.backend import kernels
    from src.model.masks import attention_mask
    from src.model.transformer import ACTIVATIONS, make_norm
    from src.train.optim import build_optimizer

    m, t = cfg.model, cfg.training
    B, L, V, d, hd = t.batch_size, m.context_length, m.vocab_size, m.d_model, m.head_dim
    H, KV, f = m.n_heads, m.kv_heads, m.ffn_dim
    streams = parts.streams[: min(len(parts.streams), B)]
    bounds = [round(i * B / len(streams)) for i in range(len(streams) + 1)]

    def rand(*shape, scale=1.0):
        a = mx.random.normal(shape) * scale
        mx.eval(a)
        return a

    def sharded(fn):
        """Compiled fn(rows of the batched arrays, shared arrays) on each stream,
        over that stream's rows, as the step splits a micro-batch."""

        def run(batched, shared):
            out = []
            for s, lo, hi in zip(streams, bounds, bounds[1:]):
                with mx.stream(s):
                    out += fn([a[lo:hi] for a in batched], shared)
            return out

        return mx.compile(run)

    def vjp(fn, primals, cotangents):
        outs, grads = mx.vjp(fn, primals, cotangents)
        return [*outs, *grads]

    def per_layer(fn, batched, shared, once=None):
        """run(): fn once per layer (each layer evaluated in turn, so only one
        layer's outputs are alive at a time), then `once` (per-step work)."""

        def run(layers=None):
            for _ in range(layers or m.n_layers):
                mx.eval(fn(batched, shared))
            if once is not None:
                mx.eval(once())

        return run

    def gemm():
        projs = projections(m)
        dims = sorted({x for p in projs for x in p})
        X = {k: rand(B, L, k) for k in dims}
        G = {k: rand(B, L, k) for k in dims}
        W = [rand(o, i, scale=0.02) for i, o in projs]
        matmul = lambda x, w: x @ w.T  # noqa: E731  (nn.Linear without bias)

        def layer(batched, shared):
            x, g = dict(zip(dims, batched)), dict(zip(dims, batched[len(dims) :]))
            out = []
            for (i, o), w in zip(projs, shared):
                out += vjp(matmul, [x[i], w], [g[o]])
            return out

        head = sharded(lambda b, s: vjp(matmul, [b[0], s[0]], [b[1]]))
        x_head, g_head, E = X[d], rand(B, L, V), rand(V, d, scale=0.02)
        batched = [X[k] for k in dims] + [G[k] for k in dims]
        return per_layer(sharded(layer), batched, W, lambda: head([x_head, g_head], [E]))  # fmt: skip

    def attention():
        mask, scale = attention_mask(L), hd**-0.5
        q, k, v, g = rand(B, H, L, hd), rand(B, KV, L, hd), rand(B, KV, L, hd), rand(B, H, L, hd)  # fmt: skip

        def layer(b, _):
            fn = lambda q, k, v: kernels.attention(q, k, v, scale=scale, mask=mask)  # noqa: E731
            return vjp(fn, b[:3], b[3:])

        return per_layer(sharded(layer), [q, k, v, g], [])

    def elementwise():
        # the model's own norms and activation; the norm weights are differentiated
        norms = nn.Module()
        norms.n1, norms.n2, norms.final = (make_norm(m, d) for _ in range(3))
        if m.qk_norm:
            norms.q, norms.k = nn.RMSNorm(hd, eps=m.norm_eps), nn.RMSNorm(hd, eps=m.norm_eps)  # fmt: skip
        flat = tree_flatten(norms.parameters())
        names, weights = [k for k, _ in flat], [v for _, v in flat]
        rope = nn.RoPE(hd, traditional=False, base=m.rope_theta)
        act = ACTIVATIONS[m.mlp]

        def use(weights):
            if names:  # none: no norm weights
                norms.update(tree_unflatten(list(zip(names, weights))))

        def block(x, q, k, gate, up, *w):
            use(w)
            a = norms.n1(x)  # stands for the attention branch's output
            if m.qk_norm:
                q, k = norms.q(q), norms.k(k)
            if m.position == "rope":
                q, k = rope(q), rope(k)
            h = x + a
            b = norms.n2(h)
            return [a, q, k, h + b, act(gate) * up if m.gated else act(up)]

        x, q, k = rand(B, L, d), rand(B, H, L, hd), rand(B, KV, L, hd)
        gate, up = rand(B, L, f), rand(B, L, f)
        cot = [rand(*a.shape) for a in (x, q, k, x, up)]
        layer = sharded(lambda b, s: vjp(block, [*b[:5], *s], b[5:]))
        tokens, E, g = mx.random.randint(0, V, (B, L)), rand(V, d, scale=0.02), rand(B, L, d)  # fmt: skip

        def ends(b, s):  # once per step: the embedding lookup, the final norm
            def fn(E, h, *w):
                use(w)
                return [E[b[0]], norms.final(h) if m.final_norm else h]

            return vjp(fn, [s[0], b[1], *s[1:]], [b[2], b[2]])

        once = sharded(ends)
        return per_layer(layer, [x, q, k, gate, up, *cot], weights,
                         lambda: once([tokens, x, g], [E, *weights]))  # fmt: skip

    def cross_entropy():
        logits, targets = rand(B, L, V), mx.random.randint(0, V, (B, L))

        def shard(b, _):
            fn = lambda z: kernels.cross_entropy(z, b[1]).sum() / (B * L)  # noqa: E731
            return list(mx.value_and_grad(fn)(b[0]))

        run = sharded(shard)
        return lambda layers=None: mx.eval(run([logits, targets], []))

    def optimizer():
        opt = build_optimizer(parts.model, t)  # a fresh state: the run's is untouched
        params = parts.model.trainable_parameters()
        grads = tree_map(lambda p: rand(*p.shape, scale=1e-3), params)

        def update(grads, params):
            grads, norm = clip_grad_norm(grads, t.grad_clip or math.inf)
            new = opt.apply_gradients(grads, params)
            return tree_map(lambda a, b: mx.where(mx.isfinite(norm), a, b), new, params)

        update = mx.compile(update, inputs=opt.state, outputs=opt.state)
        return lambda layers=None: mx.eval(update(grads, params), opt.state)

    makers = dict(gemm=gemm, attention=attention, elementwise=elementwise,
                  cross_entropy=cross_entropy, optimizer=optimizer)  # fmt: skip
    for name, make in makers.items():  # built one at a time: inputs freed after
        yield name, make()


def worker(impl: str, spec: str, init: str, warmup: int, mode: str, device: str) -> int:
    """Build, warm up, say ready; then answer one JSON command per line on stdin.
    `device`: where a torch worker computes (--torch-device)."""
    reply_to = os.fdopen(os.dup(1), "w")
    sys.stdout = sys.stderr  # only protocol lines go to the real stdout
    cfg = config_from_dict(json.loads(spec))
    is_torch = impl.startswith("torch")
    if is_torch:
        built = torch_worker(impl, cfg, init, device)
    else:
        built = mlx_worker(impl, cfg, init)
    one, gemm, base, mlx_peak, release, breakdown = built
    tic = time.perf_counter()
    first_loss = [one() for _ in range(warmup)][0]
    if release is not None and mode != "breakdown":  # breakdown: timed right away
        release()
    send = lambda msg: print(json.dumps(msg), file=reply_to, flush=True)  # noqa: E731
    send({"ready": True, "warmup_s": time.perf_counter() - tic, "loss1": first_loss})
    for line in sys.stdin:
        cmd = json.loads(line)
        if "gemm" in cmd:
            about = {"torch": torch_about(device)} if is_torch else {}
            send({"gflops": gemm(cmd["gemm"]), **about})
        elif "breakdown" in cmd:
            send(breakdown(cmd["breakdown"]))
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
    def __init__(self, impl, spec, init, warmup, timeout, mode="rounds", device="cpu"):
        cmd = [sys.executable, __file__, "--worker", impl, spec, init, str(warmup), mode, device]  # fmt: skip
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
    mlp = (3 if m.gated else 2) * d * m.ffn_dim
    matmul = m.n_layers * (attn + mlp) + m.vocab_size * d
    return 6 * matmul + 12 * m.n_layers * d * m.context_length


def bench_shape(spec: dict, impls: list[str], args, tmp: Path) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from src.backend import policy
    from src.model.transformer import Model

    t = {"grad_accum_steps": 1, "precision": args.precision}
    spec["training"] = {**spec["training"], **t}
    cfg = config_from_dict(spec)
    m, B = cfg.model, cfg.training.batch_size
    mx.random.seed(0)
    init = {k: v for k, v in tree_flatten(Model(m).parameters())}
    init["__batch__"] = mx.random.randint(0, m.vocab_size, (B, m.context_length + 1))
    path = str(tmp / f"init_{m.d_model}_{m.n_layers}.npz")
    mx.savez(path, **init)
    del init
    mx.clear_cache()  # the workers need the memory (a GPU's, for the medium shape)
    spec_json = json.dumps(spec)
    res = {"params": m.num_params(), "batch": B, "context": m.context_length}
    res["layers"] = m.n_layers
    res["precision"] = args.precision
    on_gpu = {"mlx": policy.on_gpu(), "torch": args.torch_device == "cuda"}
    sizes = {fw: args.gemm_size or gemm_size(g, args.precision) for fw, g in on_gpu.items()}  # fmt: skip
    res.update(tokens_per_step=B * m.context_length, flops_per_token=flops_per_token(m))
    rows, live = {}, {}
    for impl in impls:  # built and warmed up one at a time (mx.compile runs g++)
        timeout = args.compile_timeout if impl == "torch_compile" else 1800
        mode = "breakdown" if args.breakdown else "rounds"
        w = Worker(impl, spec_json, path, args.warmup, timeout, mode, args.torch_device)
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
    gemm = {}  # the ceiling, from the first MLX and the first torch worker
    for impl, w in live.items():
        fw = "torch" if impl.startswith("torch") else "mlx"
        if fw not in gemm:
            reply = w.ask({"gemm": sizes[fw]})
            gemm[fw] = reply["gflops"]
            res.update({"torch": reply["torch"]} if "torch" in reply else {})
    res["gemm_gflops"], ceiling = gemm, max(gemm.values(), default=math.nan)
    res["gemm_size"] = {fw: sizes[fw] for fw in gemm}
    if args.breakdown:
        res["breakdown"] = {}
        for impl, w in live.items():
            print(f"  {impl}: timing the step's components", flush=True)
            raw = w.ask({"breakdown": args.repeats})
            w.proc.stdin.close()
            w.close()
            res["breakdown"][impl] = summarize(raw, gemm_flop(m, B * m.context_length))
        res["results"] = rows
        return res
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
    timed = [k for k in IMPLS[2:] if "tok_s" in rows.get(k, {})]  # not skipped
    res["ratios"] = {f"ours/{k}": tok("ours") / tok(k) for k in timed}
    if "tok_s" in rows.get("ours_muon", {}):  # a cost: step time over AdamW's
        res["muon_step_ratio"] = tok("ours") / tok("ours_muon")
    return res


def fmt_mib(n) -> str:
    return "—" if n is None else f"{n / 2**20:,.0f} MiB"


def summarize(raw: dict, flop: int) -> dict:
    """A worker's breakdown timings as medians, shares of their sum, the whole
    step beside them, and the GEMM component's rate."""
    ms = {k: statistics.median(v) for k, v in raw["components"].items()}
    total, step = sum(ms.values()), statistics.median(raw["step"])
    return {
        "components": {k: {"ms": v, "share": v / total} for k, v in ms.items()},
        "sum_ms": total,
        "step_ms": step,
        "explained": total / step,
        "gemm_gflops": flop / ms["gemm"] / 1e6,
        "n": len(raw["step"]),
    }


def breakdown_table(name: str, desc: str, res: dict, where: str) -> str:
    bd = res["breakdown"]
    impls = list(bd)
    ratio = "ours" in bd and "torch" in bd
    n = max(r["n"] for r in bd.values())
    lines = [
        f"**({name}) {desc}: one training step by component** on "
        f"{where}: batch {res['batch']} × context {res['context']}, "
        f"fp32; ms per step, median of {n}; each component timed alone at the "
        f"step's shapes, over all {res['layers']} layers",
        "",
        "| component | " + " | ".join(f"{i} ms | {i} share" for i in impls)
        + (" | ours / torch time |" if ratio else " |"),
        "|---|" + "---|---|" * len(impls) + ("---|" if ratio else ""),
    ]  # fmt: skip

    def row(label, cells, r=None):
        tail = f" {r:.2f}× |" if ratio and r is not None else (" |" if ratio else "")
        return f"| {label} | " + " | ".join(cells) + " |" + tail

    for k, label in COMPONENTS.items():
        cells = []
        for i in impls:
            c = bd[i]["components"][k]
            rate = f" ({bd[i]['gemm_gflops']:.0f} GFLOP/s)" if k == "gemm" else ""
            cells += [f"{c['ms']:,.1f}{rate}", f"{c['share']:.0%}"]
        r = bd["ours"]["components"][k]["ms"] / bd["torch"]["components"][k]["ms"] if ratio else None  # fmt: skip
        lines.append(row(label, cells, r))
    for key, label in (("sum_ms", "**sum of the components**"), ("step_ms", "**whole step, measured**")):  # fmt: skip
        cells = [c for i in impls for c in (f"{bd[i][key]:,.1f}", "")]
        lines.append(row(label, cells, bd["ours"][key] / bd["torch"][key] if ratio else None))  # fmt: skip
    cells = [c for i in impls for c in (f"{bd[i]['explained']:.0%}", "")]
    lines.append(row("sum / step (how much the components explain)", cells))
    return "\n".join(lines + [""])


def device_label(machine: dict, devices: dict) -> str:
    """Where the numbers come from, for a header: the CPU (machine.short) when
    every framework computes on it, else each framework's device."""
    if all(d.startswith(("cpu", "Device(cpu")) for d in devices.values()):
        return machine_short(machine)
    return ", ".join(f"{fw} on {d}" for fw, d in devices.items())


def mlx_device() -> str:
    """MLX's default device, with its name on a GPU: 'Device(gpu, 0) (NVIDIA H200)'."""
    import mlx.core as mx

    device = str(mx.default_device())
    if mx.default_device().type != mx.DeviceType.gpu:
        return device
    try:
        name = mx.device_info().get("device_name")
    except (AttributeError, RuntimeError):  # an MLX without device_info
        name = None
    return f"{device} ({name})" if name else device


def ceiling_label(res: dict) -> str:
    """'2048³ fp32' (or 'mlx 8192³ / torch 2048³ bf16' when the sizes differ)."""
    sizes = res["gemm_size"]
    if len(set(sizes.values())) <= 1:
        dims = f"{next(iter(sizes.values()), 0)}³"
    else:
        dims = " / ".join(f"{fw} {n}³" for fw, n in sizes.items())
    return f"{dims} {res['precision']}"


def table(name: str, desc: str, res: dict, where: str) -> str:
    g = res["gemm_gflops"]
    lines = [
        f"**({name}) {desc}** on {where}: {res['params'] / 1e6:.1f}M params, "
        f"batch {res['batch']} × context {res['context']} (grad_accum 1), "
        f"{res['precision']}; GEMM ceiling ({ceiling_label(res)}, best of MLX / "
        "torch): " + " / ".join(f"{v:.0f}" for v in g.values()) + " GFLOP/s",
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
    lines += ["", f"Ratios (tokens/s): {ratios}", ""]
    if "muon_step_ratio" in res:
        lines += [
            "Muon's step over AdamW's (step time, ours_muon / ours): "
            f"**{res['muon_step_ratio']:.2f}×**",
            "",
        ]
    return "\n".join(lines)


BREAKDOWN_IMPLS = ["ours", "ours_plain", "torch"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python scripts/benchmark.py", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="shape set (a), fewer steps")
    p.add_argument("--generation", action="store_true", help="+ bench_generate.py")
    p.add_argument("--breakdown", action="store_true",
                   help="time the step's components instead (GEMMs, attention, "
                   "elementwise, cross-entropy, optimizer) for ours and torch")  # fmt: skip
    p.add_argument("--out", default="out/benchmark", help="writes OUT.json, OUT.md")
    p.add_argument("--shapes", nargs="+", choices=["a", "b", "speedrun", "tiny", "medium"],
                   help="shape sets (default a b; --quick: a; speedrun: "
                   "configs/speedrun.yaml; tiny: a smoke test; medium: "
                   "configs/medium.yaml, ~124M at batch 8 x 1024, for a GPU)")  # fmt: skip
    p.add_argument("--impls", nargs="+", choices=IMPLS + EXTRA_IMPLS,
                   help="implementations (default all but ours_muon; --breakdown: "
                   "ours torch)")  # fmt: skip
    count = cli.int_in(1, 10_000)
    p.add_argument("--rounds", type=count, help="timed rounds (default 5; quick 3)")
    p.add_argument("--steps", type=count, default=1, help="timed steps per turn")
    p.add_argument("--warmup", type=count, help="untimed steps per worker (2; quick 1)")  # fmt: skip
    p.add_argument("--repeats", type=count,
                   help="--breakdown: timed repeats per component (5; quick 2)")  # fmt: skip
    p.add_argument("--compile-timeout", type=cli.positive_number,
                   help="torch.compile warm-up limit, seconds")  # fmt: skip
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="compute dtype (training.precision; torch: autocast), "
                   "fp32 master weights either way; also the ceiling GEMM's dtype")  # fmt: skip
    p.add_argument("--torch-device", choices=DEVICES, default="cpu",
                   help="where the torch workers compute (cuda: a GPU PyTorch sees)")  # fmt: skip
    p.add_argument("--gemm-size", type=cli.int_in(64, 65536),
                   help="n of the n³ GEMM ceiling (default 8192 on a GPU, 2048 on "
                   "the CPU, 1024 for bf16 there)")  # fmt: skip
    p.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = cli.parse(p, argv)
    if isinstance(args, int):
        return args
    if args.worker:
        impl, spec, init, warmup, mode, device = args.worker
        return worker(impl, spec, init, int(warmup), mode, device)
    return cli.run(lambda: run(args, argv), parser=p)


def run(args, argv) -> int:
    if args.breakdown and not set(args.impls or []) <= set(BREAKDOWN_IMPLS):
        raise UsageError(f"--breakdown times {', '.join(BREAKDOWN_IMPLS)} only")
    if args.breakdown and (args.precision != "fp32" or args.torch_device != "cpu"):
        raise UsageError("--breakdown times fp32 components, torch's on the CPU")
    args.impls = args.impls or (["ours", "torch"] if args.breakdown else IMPLS)
    if args.torch_device == "cuda" and any(i.startswith("torch") for i in args.impls):
        problem = cuda_problem()
        if problem:
            raise UserError(problem)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.warmup = args.warmup or (1 if args.quick else 2)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.compile_timeout = args.compile_timeout or (150 if args.quick else 300)
    shapes = args.shapes or (["a"] if args.quick else ["a", "b"])
    check_writable(Path(args.out).parent)  # before minutes of work, not after
    versions = {k: version(k) for k in ("mlx", "mlx-lm", "torch")}
    machine = describe_machine()
    print(f"machine: {machine_summary(machine)}", flush=True)
    report = {"command": " ".join(["python scripts/benchmark.py", *(argv or sys.argv[1:])])}  # fmt: skip
    report.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    report.update(cpus=os.cpu_count(), load_start=os.getloadavg(), versions=versions)
    report["machine"] = machine
    devices = report["devices"] = {"mlx": mlx_device(), "torch": args.torch_device}
    tables = []
    all_shapes = shape_sets()
    with tempfile.TemporaryDirectory() as tmp:
        for name in shapes:
            desc, spec = all_shapes[name]
            print(f"shape set ({name}) {desc}", flush=True)
            res = report[name] = bench_shape(spec, args.impls, args, Path(tmp))
            if "torch" in res:  # torch names its GPU
                devices["torch"] = res["torch"]["device"]
            make = breakdown_table if args.breakdown else table
            tables.append(make(name, desc, res, device_label(machine, devices)))
            if ceiling_label(res) == "2048³ fp32":  # machine.summary's ceiling
                for fw, gflops in res["gemm_gflops"].items():  # the best over shapes
                    best = machine.setdefault("gemm_gflops", {})
                    best[fw] = max(best.get(fw, 0.0), gflops)
            machine.update({"torch": res["torch"]} if "torch" in res else {})
    report["load_end"] = os.getloadavg()
    what = (
        "breakdown of a training step" if args.breakdown else "training step benchmark"
    )
    timing = (
        f"median of {args.repeats} repeats per component and of the whole step"
        if args.breakdown
        else f"median of {args.rounds} rounds × {args.steps} step(s), "
        f"{args.warmup} warm-up steps excluded"
    )
    where = device_label(machine, devices)
    if where != machine_short(machine):  # a GPU: name it, and the host
        where = f"{where}, host {machine['cpu_model']}"
    else:
        where = machine["cpu_model"]
    md = [
        f"{what.capitalize()} on **{where}**, {report['date']}, "
        f"load average at start {report['load_start'][0]:.2f}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
        f"Machine: {machine_summary(machine)}.",
        "",
        f"`{report['command']}`; {timing}.",
        "",
        *tables,
    ]
    if args.generation:
        gen = ["--configs", "tiny", "--repeats", "1"] if args.quick else []
        out = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "bench_generate.py"), *gen],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        report["generation"] = out
        md += ["Generation (`scripts/bench_generate.py`):", "", "```", out.strip(), "```", ""]  # fmt: skip
    text = "\n".join(md)
    with atomic_file(f"{args.out}.json", "w") as f:
        f.write(json.dumps(report, indent=2) + "\n")
    with atomic_file(f"{args.out}.md", "w") as f:
        f.write(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
