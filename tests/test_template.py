"""Conversation rendering (src/template.py): the format the REPL speaks is the one
`prepare --chat-field` trains on, and malformed conversations are refused."""

import pytest

from src.template import CHAT, PLAIN, render_conversation

CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Bye."},
]


def test_render_matches_the_repl_template():
    want = (
        CHAT.system.format("Be brief.")
        + CHAT.user.format("Hi") + "Hello!" + CHAT.reply_end
        + CHAT.user.format("Bye") + "Bye." + CHAT.reply_end
    )  # fmt: skip
    assert render_conversation(CONVO) == want
    assert want == (
        "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|>"
        "<|user|>Bye<|end|><|assistant|>Bye.<|end|>"
    )
    assert render_conversation(CONVO[1:3], PLAIN) == "HiHello!\n"


@pytest.mark.parametrize(
    "messages, says",
    [
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        ([{"role": "bot", "content": "x"}], "message 0"),
        ([{"role": "user", "content": 3}], "message 0"),
        ([CONVO[1], CONVO[0]], "only come first"),
        ([CONVO[2]], "must follow a user"),
        ([CONVO[1], CONVO[1]], "two user messages"),
    ],
)
def test_malformed_conversations_are_refused(messages, says):
    with pytest.raises(ValueError, match=says):
        render_conversation(messages)
