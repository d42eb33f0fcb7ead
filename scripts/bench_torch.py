"""scripts/benchmark.py's PyTorch side: the torch and torch_compile workers (a
training step of src/convert/torch_model.py with torch.optim.AdamW, the same
hyperparameters, decay mask and schedule as ours), their GEMM ceiling and the
step's components for --breakdown.

The worker runs on --torch-device (cpu or cuda; model, batch and optimizer
state on it, the clock read after torch.cuda.synchronize()). With
training.precision bf16 the forward pass and the loss run under
torch.autocast(bf16) with fp32 master weights, as our step keeps them.
"""

from __future__ import annotations

import math
import re

from bench_common import best_gflops, projections, rss, timed

DEVICES = ("cpu", "cuda")


def cuda_problem() -> str | None:
    """Why torch cannot compute on CUDA here (None: it can)."""
    import torch

    if torch.cuda.is_available():
        return None
    return (
        f"--torch-device cuda: torch {torch.__version__} sees no CUDA device here "
        f"(torch.cuda.is_available() is False; built with CUDA {torch.version.cuda})"
    )


def torch_worker(impl: str, cfg, init: str, device: str = "cpu"):
    """(one step, GEMM ceiling, RSS baseline, MLX peak (None), release (None),
    breakdown) for benchmark.worker; the step returns its loss."""
    import contextlib

    import numpy as np
    import torch
    import torch.nn.functional as F

    from src.convert import torch_model

    t = cfg.training
    model = torch_model.Model(cfg.model)
    base = rss()
    data = dict(np.load(init))
    batch = torch.from_numpy(data.pop("__batch__").astype(np.int64)).to(device)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in data.items()})
    model.to(device)  # before the optimizer: its state is made on the device
    bf16 = t.precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None

    def autocast():
        if not bf16:
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=torch.bfloat16)

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
        with autocast():  # the forward pass and the loss, as ours in bf16
            logits = forward(batch[:, :-1]).float()
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or math.inf)
        opt.step()
        sched.step()
        sync()  # the step is done before the caller reads the clock
        return loss.item()

    def gemm(n: int) -> float:
        """The ceiling: an n³ GEMM in the compute dtype on the worker's device."""
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))

        def matmul():
            a @ b
            sync()

        return best_gflops(matmul, n)

    def breakdown(repeats: int) -> dict:
        step_ms = timed(one, repeats)  # first: right after the warm-up
        comps = {k: timed(f, repeats, lambda f=f: f(1)) for k, f in torch_components(cfg, model, opt)}  # fmt: skip
        return {"components": comps, "step": step_ms}

    return one, gemm, base, lambda: None, None, breakdown


def torch_about(device: str = "cpu") -> dict:
    """torch's version, BLAS, the vector ISA its kernels use here, and the device
    it computes on ("cpu", or "cuda (<GPU name>)")."""
    import torch

    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    about = {
        "version": torch.__version__,
        "blas": blas.group(1) if blas else "unknown",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    if device == "cuda":
        about["device"] = f"cuda ({torch.cuda.get_device_name()})"
        about["cuda"] = torch.version.cuda
    return about


def lr_factor(t, step: int) -> float:
    """src.train.schedule.lr_schedule divided by the peak learning rate."""
    if step < t.warmup_steps:
        return (step + 1) / max(t.warmup_steps, 1)
    progress = min(max((step - t.warmup_steps) / max(t.max_steps - t.warmup_steps, 1), 0), 1)  # fmt: skip
    return t.min_lr_ratio + 0.5 * (1 - t.min_lr_ratio) * (1 + math.cos(math.pi * progress))  # fmt: skip


def torch_components(cfg, model, opt):
    """(name, run) pairs: run() does one step's component in torch (eager)."""
    import torch
    import torch.nn.functional as F

    from src.convert.torch_model import (
        ACTIVATIONS,
        RMSNorm,
        apply_rope,
        make_norm,
        rope_angles,
    )

    m, t = cfg.model, cfg.training
    B, L, V, d, hd = t.batch_size, m.context_length, m.vocab_size, m.d_model, m.head_dim
    H, KV, f = m.n_heads, m.kv_heads, m.ffn_dim
    grad = torch.autograd.grad

    def rand(*shape, scale=1.0, leaf=True):
        return (torch.randn(*shape) * scale).requires_grad_(leaf)

    def gemm():
        projs = projections(m)
        X = {k: rand(B, L, k) for p in projs for k in p}
        G = {k: rand(B, L, k, leaf=False) for p in projs for k in p}
        W = [rand(o, i, scale=0.02) for i, o in projs]
        E, g_head = rand(V, d, scale=0.02), rand(B, L, V, leaf=False)

        def run(layers=None):
            for _ in range(layers or m.n_layers):
                for (i, o), w in zip(projs, W):
                    grad(F.linear(X[i], w), (X[i], w), G[o])
            grad(F.linear(X[d], E), (X[d], E), g_head)

        return run

    def attention():  # torch_model.Attention.forward between RoPE and o_proj
        q, k, v = rand(B, H, L, hd), rand(B, KV, L, hd), rand(B, KV, L, hd)
        g = rand(B, H, L, hd, leaf=False)

        def core(q, k, v):
            k, v = (x.repeat_interleave(H // KV, dim=1) for x in (k, v))
            scores = (q @ k.transpose(-2, -1)) * hd**-0.5
            causal = torch.ones(L, L, dtype=torch.bool).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
            return scores.float().softmax(dim=-1).to(v.dtype) @ v

        def run(layers=None):
            for _ in range(layers or m.n_layers):
                grad(core(q, k, v), (q, k, v), g)

        return run

    def elementwise():  # the model's own norms and activation
        n1, n2, n3 = (make_norm(m, d) for _ in range(3))
        nq, nk = RMSNorm(hd, m.norm_eps), RMSNorm(hd, m.norm_eps)
        act = ACTIVATIONS[m.mlp]
        x, q, k = rand(B, L, d), rand(B, H, L, hd), rand(B, KV, L, hd)
        gate, up = rand(B, L, f), rand(B, L, f)
        cot = [rand(*a.shape, leaf=False) for a in (x, q, k, x, up)]
        tokens, E = torch.randint(0, V, (B, L)), rand(V, d, scale=0.02)
        weights = [*n1.parameters(), *n2.parameters()]
        weights += [*nq.parameters(), *nk.parameters()] if m.qk_norm else []
        inputs = (x, q, k, gate, up, *weights)

        def run(layers=None):
            for _ in range(layers or m.n_layers):
                a = n1(x)  # stands for the attention branch's output
                qn, kn = (nq(q), nk(k)) if m.qk_norm else (q, k)
                if m.position == "rope":  # the angles are computed per layer there too
                    cos, sin = rope_angles(hd, m.rope_theta, torch.arange(L))
                    qn, kn = apply_rope(qn, cos, sin), apply_rope(kn, cos, sin)
                h = x + a
                b = n2(h)
                mlp = act(gate) * up if m.gated else act(up)
                grad([a, qn, kn, h + b, mlp], inputs, cot, allow_unused=True)
            outs = [F.embedding(tokens, E), n3(x) if m.final_norm else x]
            grad(outs, (E, x, *n3.parameters()), [cot[0], cot[0]], allow_unused=True)

        return run

    def cross_entropy():
        logits, targets = rand(B, L, V), torch.randint(0, V, (B, L))

        def run(layers=None):
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            grad(loss, logits)

        return run

    def optimizer():
        params = list(model.parameters())
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3

        def run(layers=None):
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip or math.inf)
            opt.step()

        return run

    makers = dict(gemm=gemm, attention=attention, elementwise=elementwise,
                  cross_entropy=cross_entropy, optimizer=optimizer)  # fmt: skip
    for name, make in makers.items():
        yield name, make()
