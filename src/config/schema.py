"""The run configuration's sections as typed dataclasses, with each field's
default and rule (`src.config.rules`). This module imports neither MLX nor torch."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .rules import (
    GATED_MLPS,
    KERNEL_SETS,
    LOSS_ON,
    MATFORMER_LOSSES,
    MAX_COUNT,
    MAX_SEED,
    MAX_VOCAB,
    MLPS,
    NORM_POSITIONS,
    NORMS,
    OPTIMIZERS,
    POSITIONS,
    PRECISIONS,
    REPORTERS,
    SCHEDULES,
    _folder_name,
    _fractions,
    choice,
    choices,
    num,
)


@dataclass
class ModelConfig:
    vocab_size: int = num(32000, ge=1, le=MAX_VOCAB)
    d_model: int = num(768, ge=1, le=2**16)
    n_layers: int = num(16, ge=1, le=1024)
    n_heads: int = num(12, ge=1, le=1024)
    # None: same as n_heads (plain multi-head)
    n_kv_heads: int | None = num(None, ge=1, le=1024)
    # None: gated MLPs 8/3 * d_model rounded up to a multiple of 256, plain ones
    # 4 * d_model (about the same parameter count)
    d_ff: int | None = num(None, ge=1, le=2**20)
    context_length: int = num(2048, ge=1, le=2**20)
    rope_theta: float = num(10000.0, gt=1, le=1e12)
    norm_eps: float = num(1e-5, ge=1e-12, le=1)
    qk_norm: bool = False
    tie_embeddings: bool = True
    dropout: float = num(0.0, ge=0, lt=1)
    init_std: float = num(0.02, gt=0, le=1)
    gradient_checkpointing: bool = False
    # feed-forward: swiglu, geglu (gated), silu, gelu, relu2 (plain; relu2 = ReLU^2)
    mlp: str = choice("swiglu", MLPS)
    # the norm of each block and the final one; pre: x + f(norm(x)), post:
    # norm(x + f(x)) with no final norm; none: no norm layers (QK-norm stays)
    norm: str = choice("rmsnorm", NORMS)
    norm_position: str = choice("pre", NORM_POSITIONS)
    position: str = choice("rope", POSITIONS)  # none: no positional encoding (NoPE)
    # > 0: local layers attend to the last `sliding_window` positions only (their
    # own included); every global_every-th layer and the last one attend to all
    sliding_window: int = num(0, ge=1, le=2**20, off=0)
    global_every: int = num(4, ge=1, le=1024)  # 1: every layer global
    # > 0: each FFN is `moe_experts` experts (each of the width above), top-k routed
    moe_experts: int = num(0, ge=2, le=256, off=0)
    moe_top_k: int = num(2, ge=1, le=256)
    # MatFormer: the FFN's first f * ffn_dim neurons form a usable smaller FFN for
    # each fraction f listed (training covers them all); [] = off
    matformer_widths: list[float] = field(
        default_factory=list, metadata={"check": _fractions}
    )
    # the 2025-26 small-model recipe (src/model/transformer.py): value embeddings
    # (v += ve(tokens) in the last layer and every second one before it), residual
    # output projections initialised at zero, logits c * tanh(logits / c) (0: off),
    # and per-layer learned scalars h = a * h + b * x0 before each block
    value_embeddings: bool = False
    zero_init_residual: bool = False
    logit_softcap: float = num(0.0, ge=1e-3, le=1e6, off=0)
    residual_scalars: bool = False

    @property
    def gated(self) -> bool:
        return self.mlp in GATED_MLPS

    @property
    def final_norm(self) -> bool:
        """Whether the backbone ends with a norm (pre-norm blocks only)."""
        return self.norm != "none" and self.norm_position == "pre"

    def layer_window(self, i: int) -> int | None:
        """Layer i's attention window (None: global attention)."""
        if not self.sliding_window:
            return None
        last = i == self.n_layers - 1
        return None if last or (i + 1) % self.global_every == 0 else self.sliding_window

    def value_embedding(self, i: int) -> bool:
        """Whether layer i has a value embedding (the last and every second one
        before it)."""
        return self.value_embeddings and (self.n_layers - 1 - i) % 2 == 0

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if not self.gated:  # two matrices instead of three: 4d keeps their size
            return 4 * self.d_model
        return 256 * math.ceil(8 * self.d_model / 3 / 256)

    def num_params(self) -> int:
        """Exact parameter count, computed without building the model."""
        d, hd = self.d_model, self.head_dim
        attn = d * hd * (self.n_heads + 2 * self.kv_heads) + self.n_heads * hd * d
        mlp = (3 if self.gated else 2) * d * self.ffn_dim
        if self.moe_experts:  # the experts and the router
            mlp = self.moe_experts * mlp + d * self.moe_experts
        norms = (2 * d if self.norm != "none" else 0) + (2 * hd if self.qk_norm else 0)
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        final = d if self.final_norm else 0
        ve = self.vocab_size * self.kv_heads * hd  # a table per value-embedding layer
        extra = sum(map(self.value_embedding, range(self.n_layers))) * ve
        extra += 2 * self.n_layers if self.residual_scalars else 0
        return self.n_layers * (attn + mlp + norms) + embed + final + extra


@dataclass
class DataConfig:
    train_path: str = "data/tinystories/train.bin"
    val_path: str = "data/tinystories/val.bin"
    tokenizer_path: str = "data/tokenizer"


@dataclass
class TrainingConfig:
    seed: int = num(1337, ge=0, le=MAX_SEED)
    batch_size: int = num(16, ge=1, le=2**20)  # micro-batch, sequences per forward
    # effective batch = batch_size * grad_accum_steps
    grad_accum_steps: int = num(1, ge=1, le=2**20)
    max_steps: int = num(1000, ge=1, le=MAX_COUNT)
    # > 0: max_steps = what fits (src/train/budget.py); 1e5 minutes is ~70 days
    time_budget_minutes: float = num(0.0, ge=0, le=1e5)
    optimizer: str = choice("adamw", OPTIMIZERS)  # src/train/optim.py
    # muon: the block matrices' optimizer (the rest keeps AdamW at learning_rate)
    muon_learning_rate: float = num(0.02, gt=0, le=10)
    muon_momentum: float = num(0.95, ge=0, lt=1)
    muon_weight_decay: float = num(0.0, ge=0, le=1)
    # mixture of experts: weight of the load-balancing loss added to the loss
    moe_aux_loss: float = num(0.01, ge=0, le=100)
    # MatFormer: one width per step (sample) or every width's loss summed (sum)
    matformer_loss: str = choice("sample", MATFORMER_LOSSES)
    learning_rate: float = num(3e-4, gt=0, le=1)
    # after the warm-up: cosine decay, or warmup-stable-decay (src/train/schedule.py)
    schedule: str = choice("cosine", SCHEDULES)
    # both decay to learning_rate * min_lr_ratio
    min_lr_ratio: float = num(0.1, ge=0, le=1)
    warmup_steps: int = num(100, ge=0, le=MAX_COUNT)
    # wsd: the share of max_steps at the end that decays linearly (0: no decay)
    decay_fraction: float = num(0.2, ge=0, le=1)
    # <= 1: AdamW multiplies weights by 1 - lr * weight_decay, which stays >= 0
    weight_decay: float = num(0.1, ge=0, le=1)
    decay_embeddings: bool = False
    beta1: float = num(0.9, ge=0, lt=1)
    beta2: float = num(0.95, ge=0, lt=1)
    eps: float = num(1e-8, ge=1e-30, le=1)  # float32 keeps it (not 0)
    grad_clip: float = num(1.0, ge=0, le=1e6)  # global-norm clip; 0 disables
    label_smoothing: float = num(0.0, ge=0, lt=1)
    precision: str = choice("auto", PRECISIONS)  # src/backend/policy.py
    compile: bool = True
    # streams a micro-batch is split across; 0 = auto (src/backend/policy.py)
    streams: int = num(0, ge=0, le=16)
    # the CPU backend's kernels: auto = measured at start (src/train/autotune.py)
    kernels: str = choice("auto", KERNEL_SETS)
    autotune: bool = True  # auto settings above: measured (cached), not assumed
    # a new run from these weights (our checkpoint or a Hugging Face folder): step 0,
    # fresh optimizer and schedule, the source's architecture and tokenizer
    init_from: str | None = None
    # the tokens the loss counts: all, or the assistant's replies of chat data
    # (prepare --chat); auto = assistant for chat data, else all
    loss_on: str = choice("auto", LOSS_ON)
    # non-finite steps in a row before giving up
    max_consecutive_skips: int = num(10, ge=1, le=MAX_COUNT)
    # warn when loss > factor * moving average
    spike_factor: float = num(10.0, gt=1, le=1e6)


@dataclass
class EvalConfig:
    interval: int = num(200, ge=0, le=MAX_COUNT)  # steps between validations; 0: off
    max_tokens: int = num(65536, ge=1, le=MAX_COUNT)  # validation tokens per eval
    sample_prompts: list[str] = field(default_factory=lambda: ["Once upon a time"])
    sample_tokens: int = num(48, ge=0, le=2**20)
    # 0 = greedy; a tiny one would overflow the logits / temperature
    temperature: float = num(0.8, ge=1e-3, le=100, off=0)


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    # steps between checkpoints; a final one is always written
    interval: int = num(500, ge=0, le=MAX_COUNT)
    keep_last: int = num(3, ge=1, le=MAX_COUNT)


@dataclass
class LoggingConfig:
    dir: str = "logs"
    interval: int = num(10, ge=1, le=MAX_COUNT)
    progress_bar: bool = True
    # experiment trackers that get the metrics.jsonl rows too: [tensorboard, wandb]
    report_to: list[str] = choices(REPORTERS)
    wandb_project: str = "mlx-slm"  # wandb.init(project=...)


@dataclass
class Config:
    run_name: str = field(default="run", metadata={"check": _folder_name})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
