"""Conversation templates (src/template.py): the format the REPL speaks is the one
`prepare --chat` renders training data in; malformed conversations are refused;
conversations -> token files -> a trained checkpoint whose REPL picks the chat
template by itself."""

import json

import numpy as np
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


def conversations(corpus, n=300) -> list[dict]:
    stories = corpus.read_text(encoding="utf-8").split("<|endoftext|>")
    rows = []
    for story in stories[:n]:
        first, _, rest = story.strip().partition(". ")
        if rest:
            msgs = [{"role": "user", "content": first + "."}]
            rows.append({"messages": msgs + [{"role": "assistant", "content": rest}]})
    return rows


def test_chat_data_to_a_checkpoint_that_chats(tiny_dataset, tiny_corpus, train_tiny,
                                              tmp_path, capsys):  # fmt: skip
    from src.data import cli as data
    from src.data.tokens import open_tokens
    from src.inference import cli as inference
    from src.inference.chat import pick_template
    from src.tokenizer.spm import Tokenizer

    rows = conversations(tiny_corpus)
    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out, tok_dir = tmp_path / "chat-data", str(tiny_dataset["tokenizer"])
    args = ["prepare", "--input", str(jsonl), "--tokenizer", tok_dir, "--chat"]
    assert data.main([*args, "--output", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["chat_template"] is True and meta["text_field"] == "messages"
    tok = Tokenizer.load(tok_dir)
    tokens = np.concatenate([open_tokens(out / f) for f in ("train.bin", "val.bin")])
    first = tokens[: int(np.argmax(tokens == tok.eos_id))].tolist()
    assert tok.decode(first) in {render_conversation(r["messages"]) for r in rows}
    user, end, assistant = (
        tok.encode(m)[0] for m in ("<|user|>", "<|end|>", "<|assistant|>")
    )
    assert first[0] == user and [end, assistant] in [
        first[i : i + 2] for i in range(len(first))
    ]

    ck, _ = train_tiny(
        tmp_path / "run", training__max_steps=4, eval__interval=4, eval__max_tokens=256,
        checkpoint__interval=4, data__train_path=out / "train.bin",
        data__val_path=out / "val.bin",
    )  # fmt: skip
    _, tok2, ck_meta = inference.load_model(ck / "best")
    assert ck_meta["chat_template"] is True
    assert pick_template("auto", tok2, ck_meta) is CHAT

    # plain data keeps plain checkpoints; user mistakes exit 2 with a message
    plain = data.main(["prepare", "--input", str(jsonl), "--tokenizer", tok_dir,
                       "--output", str(tmp_path / "p"), "--text-field", "messages"])  # fmt: skip
    assert plain == 2 and "use --chat" in capsys.readouterr().err
    txt = data.main(
        [*args[:2], str(tiny_corpus), *args[3:], "--output", str(tmp_path / "t")]
    )
    assert txt == 2 and "--chat reads conversations" in capsys.readouterr().err
    jsonl.write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}]}))
    assert data.main([*args, "--output", str(tmp_path / "b")]) == 2
    assert "row 0" in capsys.readouterr().err
