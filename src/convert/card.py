"""What an export says about its model: the Hugging Face model card (`README.md`
of `--to hf`) and the facts it shares with the GGUF metadata of `--to gguf`.

Every number comes from the checkpoint or the run's own records, never from a
guess: the architecture from the config in meta.json; tokens seen from the step
and the config (each optimizer step reads batch_size x grad_accum_steps windows
of context_length tokens, split over the ranks, whatever their number); the
validation loss from meta.json (written with the checkpoint when its step was a
validation step), and perplexity and bits per byte from the run's metrics.jsonl
row of that step (found through the config's logging.dir, relative to where the
run started). What is not recorded is said to be "not recorded".
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.contents import Checkpoint
from ..template import CHAT

NOT_RECORDED = "not recorded"


def chat_template_jinja() -> str:
    """`src.template.CHAT` as a Hugging Face / llama.cpp Jinja chat template: the
    same text `render_conversation` makes (the user turn already opens the reply,
    so no generation prompt is added)."""
    system, user = CHAT.system.split("{}"), CHAT.user.split("{}")
    content = "{{ message['content'] }}"
    return (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}"
        f"{system[0]}{content}{system[1]}"
        "{% elif message['role'] == 'user' %}"
        f"{user[0]}{content}{user[1]}"
        "{% else %}"
        f"{content}{CHAT.reply_end}"
        "{% endif %}{% endfor %}"
    )


@dataclass
class Validation:
    step: int | None
    loss: float
    perplexity: float
    bits_per_byte: float | None
    source: str  # where the numbers were read


@dataclass
class Facts:
    """What the checkpoint records about its training (None: not recorded)."""

    step: int | None
    tokens_seen: int | None
    tokens_rule: str  # how tokens_seen was counted, or why it is not known
    train_data: str | None
    val_data: str | None
    inputs: list[str] = field(default_factory=list)  # the corpus of the data
    hub_datasets: list[str] = field(default_factory=list)
    world_size: int | None = None
    validation: Validation | None = None
    best_val_loss: float | None = None
    chat: bool = False
    imported_from: str | None = None


def _number(v) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    return float(v) if ok and math.isfinite(v) else None


def run_root(ck: Checkpoint) -> Path | None:
    """The folder the run was started from, when the checkpoint is still where
    training wrote it (`<root>/<checkpoint.dir>/<run_name>/step_N`)."""
    cfg = ck.config
    tail = Path(os.path.normpath(cfg.checkpoint.dir)) / cfg.run_name
    if tail.is_absolute() or ".." in tail.parts:
        return None
    run = ck.path.parent.parts
    n = len(tail.parts)
    return Path(*run[:-n]) if run[-n:] == tail.parts and len(run) > n else None


def _resolve(path: str, root: Path | None) -> Path | None:
    """A path of the config: absolute, else under the run's root, else under the
    current folder; the first that exists."""
    p = Path(path)
    candidates = [p] if p.is_absolute() or root is None else [root / p, p]
    return next((c for c in candidates if c.exists()), None)


def _eval_row(metrics: Path, step: int) -> dict | None:
    """The last "eval" row of metrics.jsonl for `step` (None if there is none or
    the file cannot be read)."""
    found = None
    try:
        with open(metrics, encoding="utf-8", errors="replace") as f:
            for line in f:
                if '"eval"' not in line:
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and row.get("event") == "eval":
                    if (
                        row.get("step") == step
                        and _number(row.get("val_loss")) is not None
                    ):
                        found = row
    except OSError:
        return None
    return found


def _validation(ck: Checkpoint, root: Path | None) -> Validation | None:
    step, meta = ck.meta.get("step"), ck.meta
    metrics = _resolve(
        str(Path(ck.config.logging.dir) / ck.config.run_name / "metrics.jsonl"), root
    )
    row = _eval_row(metrics, step) if metrics and isinstance(step, int) else None
    loss = _number(meta.get("val_loss"))
    if loss is None and row is None:
        return None
    if loss is not None and not (
        row and math.isclose(row["val_loss"], loss, rel_tol=1e-9)
    ):  # the log is missing, or it is another run's: only meta.json speaks
        return Validation(step, loss, math.exp(min(loss, 700.0)), None, "meta.json")
    source = f"{metrics}" if loss is None else f"meta.json and {metrics}"
    loss = row["val_loss"]
    ppl = _number(row.get("val_ppl"))
    ppl = ppl if ppl is not None else math.exp(min(loss, 700.0))
    return Validation(step, loss, ppl, _number(row.get("val_bpb")), source)


def _inputs(train_path: str, root: Path | None) -> tuple[list[str], list[str]]:
    """(the corpus sources the token files were made from, hub dataset names),
    from the meta.json `src.data prepare` writes beside them."""
    train = _resolve(train_path, root)
    side = train.parent / "meta.json" if train else None
    try:
        meta = json.loads(side.read_text(encoding="utf-8")) if side else {}
    except (OSError, ValueError):
        return [], []
    inputs, hub = [], []
    sources = meta.get("inputs") if isinstance(meta, dict) else None
    for src in sources if isinstance(sources, list) else []:
        if not isinstance(src, dict):
            continue
        if isinstance(src.get("hf_dataset"), str):
            name = src["hf_dataset"]
            hub.append(name)
            extra = "".join(
                f", {k} {src[k]}" for k in ("config", "split") if src.get(k)
            )
            inputs.append(f"{name} (Hugging Face hub{extra})")
        elif isinstance(src.get("path"), str):
            size = src.get("bytes")
            inputs.append(
                f"{src['path']} ({size:,} bytes)"
                if isinstance(size, int)
                else src["path"]
            )
    return inputs, hub


def training_facts(ck: Checkpoint) -> Facts:
    """What `ck` records about how it was trained (see the module docstring)."""
    cfg, meta = ck.config, ck.meta
    step = meta.get("step") if isinstance(meta.get("step"), int) else None
    imported = meta.get("imported_from")
    if imported:  # its training config is not the one it was trained with
        return Facts(
            step, None, f"{NOT_RECORDED} (imported from {imported})", None, None,
            imported_from=str(imported), chat=bool(meta.get("chat_template")),
        )  # fmt: skip
    t, m = cfg.training, cfg.model
    if step is None:
        tokens, rule = None, NOT_RECORDED
    else:
        tokens = step * t.batch_size * t.grad_accum_steps * m.context_length
        rule = (
            f"{step:,} steps × {t.batch_size} sequences × {t.grad_accum_steps} "
            f"accumulation × {m.context_length} tokens"
        )
    root = run_root(ck)
    inputs, hub = _inputs(cfg.data.train_path, root)
    world = meta.get("world_size")
    return Facts(
        step=step,
        tokens_seen=tokens,
        tokens_rule=rule,
        train_data=cfg.data.train_path,
        val_data=cfg.data.val_path,
        inputs=inputs,
        hub_datasets=hub,
        world_size=world if isinstance(world, int) else None,
        validation=_validation(ck, root),
        best_val_loss=_number(meta.get("best_val_loss")),
        chat=bool(meta.get("chat_template")),
    )


# ------------------------------------------------------------------ the card


def _row(key: str, value) -> str:
    value = str(value).replace("|", "\\|").replace("\n", " ")  # one table cell
    return f"| {key} | {value} |"


def _or_not(v, fmt: str) -> str:
    return NOT_RECORDED if v is None else format(v, fmt)


def model_card(
    ck: Checkpoint, folder: str, dtype: str, config: dict | None = None
) -> str:
    """README.md of a `--to hf` folder (`folder`: how to name it in the code;
    `config`: its config.json, for the model type)."""
    cfg, m = ck.config, ck.config.model
    facts = training_facts(ck)
    arch = "qwen3" if m.qk_norm else "llama"
    cls = "Qwen3ForCausalLM" if m.qk_norm else "LlamaForCausalLM"
    if config:
        arch, cls = config["model_type"], config["architectures"][0]
    options = []
    if m.moe_experts:
        options.append(
            _row("experts", f"{m.moe_experts} per layer, top-{m.moe_top_k} routed")
        )
    if m.sliding_window:
        local = sum(m.layer_window(i) is not None for i in range(m.n_layers))
        options.append(
            _row(
                "sliding window",
                f"{m.sliding_window} tokens in {local} of "
                f"{m.n_layers} layers (`layer_types`)",
            )  # fmt: skip
        )
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    front += ["tags:", "- mlx-slm-trainer", f"- {arch}", "- mlx", "- safetensors"]
    if facts.chat:
        front.append("- conversational")
    if facts.hub_datasets:
        names = dict.fromkeys(facts.hub_datasets)  # JSON strings are YAML
        front += ["datasets:"] + [f"- {json.dumps(d)}" for d in names]
    front.append("---")
    at = f" at step {facts.step:,}" if facts.step is not None else ""
    out = [
        *front,
        "",
        f"# {cfg.run_name}",
        "",
        f"A small `{arch}` language model trained from scratch with mlx-slm-trainer, "
        f"exported{at} with {dtype} weights.",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        _row("type", f"`{arch}` ({cls})"),
        _row("parameters", f"{m.num_params():,}"),
        _row("d_model", m.d_model),
        _row("layers", m.n_layers),
        _row("attention heads", m.n_heads),
        _row("kv heads", m.kv_heads),
        _row("head dim", m.head_dim),
        _row(f"feed-forward ({m.mlp})", m.ffn_dim),
        _row("context length", m.context_length),
        _row("vocabulary", m.vocab_size),
        _row("RoPE theta", f"{m.rope_theta:g}"),
        _row("RMSNorm eps", f"{m.norm_eps:g}"),
        _row("QK-norm", "yes" if m.qk_norm else "no"),
        _row("tied embeddings", "yes" if m.tie_embeddings else "no"),
        *options,
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        _row("step", _or_not(facts.step, ",")),
        _row("tokens seen", _or_not(facts.tokens_seen, ",")),
        _row("tokens seen, counted as", facts.tokens_rule),
        _row("training data", _code(facts.train_data)),
        _row("validation data", _code(facts.val_data)),
    ]
    for i, src in enumerate(facts.inputs):
        out.append(_row("made from" if i == 0 else "", src))
    if m.zero_init_residual:  # the only training-time model option a card shows
        out.append(_row("initialisation", "residual output projections at zero"))
    if facts.world_size is not None:
        out.append(_row("data-parallel ranks", facts.world_size))
    if facts.imported_from:
        out.append(_row("imported from", f"`{facts.imported_from}`"))
    v = facts.validation
    out += ["", "## Validation", "", "| | |", "|---|---|"]
    if v is None:
        out.append(_row("validation loss", f"{NOT_RECORDED} for this step"))
    else:
        out += [
            _row("validation step", _or_not(v.step, ",")),
            _row("validation loss", f"{v.loss:.4f}"),
            _row("perplexity", f"{v.perplexity:.3f}"),
            _row("bits per byte", _or_not(v.bits_per_byte, ".4f")),
            _row("read from", f"`{v.source}`"),
        ]
    if facts.best_val_loss is not None:
        out.append(
            _row("best validation loss of the run", f"{facts.best_val_loss:.4f}")
        )
    out += ["", *_usage(folder, facts.chat)]
    return "\n".join(out) + "\n"


def _code(v: str | None) -> str:
    return NOT_RECORDED if v is None else f"`{v}`"


def _usage(folder: str, chat: bool) -> list[str]:
    if chat:
        prompt = [
            'messages = [{"role": "user", "content": "Tell me a story."}]',
            "prompt = tok.apply_chat_template(messages, tokenize=False)",
        ]
        note = (
            "This model was trained on conversations in the chat template "
            "`<|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>`; "
            "`tokenizer_config.json` carries it as `chat_template`, so "
            "`apply_chat_template` renders it. A reply ends with `<|end|>`, which "
            "`config.json` and `generation_config.json` list among the EOS ids "
            "(`eos_token_id`), so generation stops at the end of the reply."
        )
        cli_prompt = '--prompt "Tell me a story." --max-tokens 100'
    else:
        prompt = ['prompt = "Once upon a time"']
        note = (
            "This model was trained on plain text (no chat template): give it the "
            "start of a text to continue. The tokenizer adds no BOS token, as in "
            "training."
        )
        cli_prompt = '--prompt "Once upon a time" --max-tokens 100'
    return [
        "## Use",
        "",
        note,
        "",
        "With transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tok = AutoTokenizer.from_pretrained("{folder}")',
        f'model = AutoModelForCausalLM.from_pretrained("{folder}")',
        *prompt,
        'inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)',
        "ids = model.generate(**inputs, max_new_tokens=100, do_sample=True)",
        "print(tok.decode(ids[0], skip_special_tokens=True))",
        "```",
        "",
        "With mlx-lm:",
        "",
        "```bash",
        f'mlx_lm.generate --model "{folder}" {cli_prompt}',
        *([f'mlx_lm.chat --model "{folder}"'] if chat else []),
        "```",
    ]
