"""How conversation turns become text: the one place that says so.

The chat REPL (`src.inference.chat`) uses these templates to turn what is typed
into tokens, and `python -m src.data prepare --chat` renders conversations with
`CHAT` into training documents, so a model fine-tuned on them is spoken to in the
format it learned. Markers such as "<|user|>" are reserved tokens of our
tokenizers (`src.tokenizer.spm.CHAT_MARKERS`): inside these strings they encode to
their single ids. No MLX here: reading a corpus imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    name: str
    system: str  # "{}" is the system prompt
    user: str  # "{}" is the user's text; ends where the reply starts
    reply_end: str  # appended after each reply
    stop_markers: tuple[str, ...]  # tokens that end a reply, besides EOS


CHAT = Template(
    "chat",
    "<|system|>{}<|end|>",
    "<|user|>{}<|end|><|assistant|>",
    "<|end|>",
    ("<|end|>",),
)
PLAIN = Template("plain", "{}\n", "{}", "\n", ())


def render_conversation(messages, template: Template = CHAT) -> str:
    """A conversation, a list of {"role": system|user|assistant, "content": str}
    (the Hugging Face "messages" layout), as one text in `template`'s format. A
    system message may only come first; an assistant message answers a user one.
    ValueError names what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation must be a non-empty list of messages")
    parts, last = [], None
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ValueError(
                f"message {i}: expected {{'role': system|user|assistant, "
                f"'content': text}}, got {str(m)[:80]!r}"
            )
        if role == "system" and i > 0:
            raise ValueError(f"message {i}: a system message may only come first")
        if role == "assistant" and last != "user":
            raise ValueError(
                f"message {i}: an assistant message must follow a user one"
            )
        if role == "user" and last == "user":
            raise ValueError(f"message {i}: two user messages in a row")
        if role == "system":
            parts.append(template.system.format(content))
        elif role == "user":
            parts.append(template.user.format(content))
        else:
            parts.append(content + template.reply_end)
        last = role
    return "".join(parts)
