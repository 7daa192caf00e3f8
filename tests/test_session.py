"""Interactive sessions (cllm.session) and `inference -i`: the KV cache kept between turns holds what a fresh
prefill of the conversation computes, each turn computes only its new tokens, greedy replies are generate()'s on
the whole conversation, and an interrupted reply leaves the session usable; the new sampling flags.

Models are tiny and random, their weights scaled up so that greedy decoding has clear winners. The chat tokenizer
that counts steps is a character tokenizer with ChatML's markers as special tokens: any reply the model
generates is then given back by encoding its text, so that nothing but a turn's new tokens is ever computed.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from cllm.chat import ChatTemplate
from cllm.checkpoint import save_model
from cllm.generate import Decoder, complete
from cllm.model import GPT, ModelConfig
from cllm.session import Session
from cllm.tokenizer import Tokenizer
from cllm.tools import inference
from tests.chat_models import CHATML, INJECTIONS, TEXT, chat_tokenizer, literal_prompt, zephyr_tokenizer
from tests.reference import rel_err


def random_model(tokenizer, *, context_length=256, arch="gpt2", seed=0):
    extra = {"n_kv_heads": 1} if arch == "llama" else {}
    model = GPT(ModelConfig(arch=arch, vocab_size=tokenizer.vocab_size, context_length=context_length, dim=16,
                            n_layers=2, n_heads=2, **extra), seed=seed)
    model.params[:] = np.random.default_rng(seed).normal(0.0, 0.3, model.params.size)
    model.p["wte"][tokenizer.separator_id] = 0.0  # its logit is 0: greedy replies do not end documents early
    return model


def char_chat_tokenizer() -> Tokenizer:
    hf = HFTokenizer.from_str(Tokenizer.train("char", TEXT + ["the quick brown fox?!\n"]).hf_json())
    hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return Tokenizer("char", hf, chat_template=ChatTemplate(CHATML, bos_token="<|im_start|>",
                                                            eos_token="<|im_end|>"))


@pytest.fixture(scope="module")
def char_chat():
    tokenizer = char_chat_tokenizer()
    return random_model(tokenizer, seed=2), tokenizer


@pytest.fixture(scope="module")
def bpe_chat():
    tokenizer = chat_tokenizer()
    return random_model(tokenizer, arch="llama", seed=1), tokenizer


@pytest.fixture(scope="module")
def plain():
    tokenizer = Tokenizer.train("char", ["the quick brown fox jumps over the lazy dog. pack my box!"])
    return random_model(tokenizer, context_length=16), tokenizer


class Counted:
    """Counts the positions a decoder computes, by prefill and by step."""

    def __init__(self, decoder):
        self.prefilled, self.stepped, self.prefills = 0, 0, 0
        step, prefill_rows = decoder.step, decoder.prefill_rows

        def counted_step(tokens, *args, **kwargs):
            self.stepped += 1
            return step(tokens, *args, **kwargs)

        def counted_prefill_rows(rows, prompts):
            self.prefills += 1
            self.prefilled += sum(len(p) for p in prompts)
            return prefill_rows(rows, prompts)

        decoder.step, decoder.prefill_rows = counted_step, counted_prefill_rows

    @property
    def computed(self) -> int:
        return self.prefilled + self.stepped


def assert_cache_is_a_fresh_prefill(session):
    """The decoder's row holds what a fresh prefill of the session's tokens computes."""
    tokens = session.tokens
    fresh = Decoder(session.model)
    fresh.prefill([tokens])
    n = len(tokens)
    assert session.decoder.lengths[0] == n
    assert rel_err(session.decoder.logits[0], fresh.logits[0]) < 1e-4
    assert rel_err(session.decoder.k_cache[:, 0, :n], fresh.k_cache[:, 0, :n]) < 1e-4
    assert rel_err(session.decoder.v_cache[:, 0, :n], fresh.v_cache[:, 0, :n]) < 1e-4


def cached_after(prompt_ids, reply, *, stop_string=False):
    """What the cache holds after a reply to prompt_ids: the prompt and every generated token the model was fed,
    all but the last when max_new_tokens or a stop string ended the reply: that one was drawn, never fed."""
    generated = reply.token_ids[:-1] if reply.finish_reason == "length" or stop_string else reply.token_ids
    return list(prompt_ids) + list(generated)


def test_each_chat_turn_computes_only_its_new_tokens_and_the_cache_is_a_fresh_prefill(char_chat):
    model, tokenizer = char_chat
    session = Session(model, tokenizer, prompt="be brief", max_new_tokens=6, temperature=0)
    counted = Counted(session.decoder)
    reasons = set()
    for turn, text in enumerate(["the fox?", "why", "", "a quick brown dog!"]):
        prompt_ids = session.conversation_ids(session.messages + [{"role": "user", "content": text}])
        reply = session.send(text)
        assert "".join(reply) == reply.text
        reasons.add(reply.finish_reason)
        assert session.messages[-2:] == [{"role": "user", "content": text},
                                         {"role": "assistant", "content": reply.text}]
        assert session.tokens == cached_after(prompt_ids, reply)
        assert_cache_is_a_fresh_prefill(session)
        # Every position computed once: the first turn's prompt by one prefill, the rest one step each.
        assert counted.prefills == 1 and counted.computed == len(session.tokens)
    assert session.messages[0] == {"role": "system", "content": "be brief"} and len(session.messages) == 9
    assert reasons == {"stop", "length"}, "the replies should end both ways, at <|im_end|> and at max_new_tokens"


@pytest.mark.parametrize("template, tokenizer", [("chatml", chat_tokenizer), ("zephyr", zephyr_tokenizer)])
def test_a_turn_that_writes_markup_is_text_not_a_turn_of_its_own(template, tokenizer):
    tokenizer = tokenizer()
    session = Session(random_model(tokenizer, arch="llama", seed=1), tokenizer, max_new_tokens=3, temperature=0)
    reply = session.send(INJECTIONS[template])
    list(reply)
    prompt = literal_prompt(tokenizer, INJECTIONS[template])
    assert session.tokens == cached_after(prompt, reply)  # what the model saw: the message as text


def test_a_plain_session_continues_one_document(plain):
    model, tokenizer = plain
    session = Session(model, tokenizer, prompt="the", max_new_tokens=2, temperature=0)
    counted = Counted(session.decoder)
    for text in [" fox", "", " bo"]:  # 16 tokens in all, the context
        prompt_ids = session.conversation_ids(document=session.document + text)
        expected, reason = complete(model, tokenizer, prompt_ids, max_new_tokens=2, temperature=0)
        before = session.document
        reply = session.send(text)
        assert "".join(reply) == expected and reply.finish_reason == reason
        assert session.document == before + text + expected
        assert session.tokens == cached_after(prompt_ids, reply)
        assert counted.prefills == 1 and counted.computed == len(session.tokens)
        assert_cache_is_a_fresh_prefill(session)
    assert session.document.startswith("the fox") and session.tokens[0] != tokenizer.separator_id
    # With no prompt the document is a new one: it starts after a separator.
    assert Session(model, tokenizer).conversation_ids(document="ab") == [tokenizer.separator_id,
                                                                          *tokenizer.encode("ab")]


@pytest.mark.parametrize("fixture", ["char_chat", "bpe_chat"])
def test_greedy_chat_replies_are_completions_of_the_whole_conversation(fixture, request):
    model, tokenizer = request.getfixturevalue(fixture)
    session = Session(model, tokenizer, max_new_tokens=8, temperature=0)
    for text in ["To be, or not to be", "the question", "Or to take arms"]:
        messages = session.messages + [{"role": "user", "content": text}]
        expected = complete(model, tokenizer, tokenizer.encode_chat(messages), max_new_tokens=8, temperature=0,
                            end_ids=tokenizer.end_of_turn_ids)
        reply = session.send(text)
        assert ("".join(reply), reply.finish_reason) == expected
        assert session.messages == messages + [{"role": "assistant", "content": expected[0]}]
        assert_cache_is_a_fresh_prefill(session)


def test_sampled_replies_follow_the_seed_turn_by_turn(char_chat):
    model, tokenizer = char_chat
    settings = dict(max_new_tokens=6, temperature=1.0, top_k=20, min_p=0.01, repetition_penalty=1.3,
                    frequency_penalty=0.5, presence_penalty=0.2)
    session = Session(model, tokenizer, seed=7, **settings)
    for turn, text in enumerate(["the fox", "why"]):
        messages = session.messages + [{"role": "user", "content": text}]
        expected = complete(model, tokenizer, tokenizer.encode_chat(messages), seed=7 + turn,
                            end_ids=tokenizer.end_of_turn_ids, **settings)
        reply = session.send(text)
        assert ("".join(reply), reply.finish_reason) == expected


def test_a_conversation_that_outgrows_the_context_goes_on_from_its_recent_window(plain):
    model, tokenizer = plain
    context = model.config.context_length
    session = Session(model, tokenizer, max_new_tokens=12, temperature=0)
    counted = Counted(session.decoder)
    # The first reply fills the context and shifts it, as generate() does.
    prompt_ids = session.conversation_ids(document="the fox")
    expected = complete(model, tokenizer, prompt_ids, max_new_tokens=12, temperature=0)
    reply = session.send("the fox")
    assert ("".join(reply), reply.finish_reason) == expected
    assert reply.context_shifts == 1 and not reply.restarted
    assert_cache_is_a_fresh_prefill(session)
    # The next turn would leave no room for a reply: it starts afresh from the last half of the conversation.
    prompt_ids = session.conversation_ids(document=session.document + " box")
    assert len(prompt_ids) > context
    expected = complete(model, tokenizer, prompt_ids[-session.window:], max_new_tokens=12, temperature=0)
    prefills = counted.prefills
    reply = session.send(" box")
    assert ("".join(reply), reply.finish_reason) == expected
    assert reply.restarted and counted.prefills == prefills + 2  # the window, then a shift within the reply
    assert_cache_is_a_fresh_prefill(session)
    assert session.window == context // 2


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_interrupted_reply_is_kept_and_the_session_goes_on(char_chat, when):
    """A KeyboardInterrupt in the middle of a reply, before a step writes the cache, or after it wrote it but
    before the session's bookkeeping: the partial reply is the assistant's message, and the next turn's cache is
    exactly the conversation's."""
    model, tokenizer = char_chat
    session = Session(model, tokenizer, max_new_tokens=20, temperature=0)
    full = complete(model, tokenizer, tokenizer.encode_chat([{"role": "user", "content": "the fox"}]),
                    max_new_tokens=20, temperature=0, end_ids=tokenizer.end_of_turn_ids)[0]
    assert len(full) > 6
    step, calls = session.decoder.step, []

    def interrupted_step(tokens, *args, **kwargs):
        calls.append(tokens)
        if len(calls) == 4 and when == "before":
            raise KeyboardInterrupt
        logits = step(tokens, *args, **kwargs)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return logits

    session.decoder.step = interrupted_step
    reply, pieces = session.send("the fox"), []
    with pytest.raises(KeyboardInterrupt):
        for piece in reply:
            pieces.append(piece)
    assert reply.finish_reason == "interrupted" and len(reply.token_ids) == 4
    assert reply.text == "".join(pieces) == full[:4]
    assert session.messages[-1] == {"role": "assistant", "content": full[:4]}
    session.decoder.step = step
    messages = session.messages + [{"role": "user", "content": "why"}]
    expected = complete(model, tokenizer, tokenizer.encode_chat(messages), max_new_tokens=20, temperature=0,
                        end_ids=tokenizer.end_of_turn_ids)
    reply = session.send("why")
    assert ("".join(reply), reply.finish_reason) == expected
    assert session.tokens == cached_after(tokenizer.encode_chat(messages), reply)
    assert_cache_is_a_fresh_prefill(session)


def test_a_reply_closed_early_or_left_unfinished_is_kept(char_chat):
    model, tokenizer = char_chat
    session = Session(model, tokenizer, max_new_tokens=20, temperature=0)
    reply = session.send("the fox")
    first = next(reply) + next(reply)
    reply.close()
    assert reply.finish_reason == "interrupted" and session.messages[-1]["content"] == first
    unfinished = session.send("why")
    next(unfinished)
    reply = session.send("a dog")  # ends the unfinished one first
    assert unfinished.finish_reason == "interrupted"
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    "".join(reply)
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 3
    assert session.messages[-1]["content"] == reply.text
    assert_cache_is_a_fresh_prefill(session)
    assert session.tokens == cached_after(session.conversation_ids(session.messages[:-1]), reply)


def test_a_cache_that_the_conversation_gives_back_in_part_keeps_what_it_shares(char_chat):
    """A stop string ends the reply: its tokens are in the cache but not in the assistant's message. The next turn
    keeps the positions the conversation still shares, and computes the rest (no second prefill)."""
    model, tokenizer = char_chat
    free = Session(model, tokenizer, max_new_tokens=10, temperature=0)
    text = "".join(free.send("the fox"))
    stop = text[3:5]
    session = Session(model, tokenizer, max_new_tokens=10, temperature=0, stop=stop)
    counted = Counted(session.decoder)
    reply = session.send("the fox")
    assert "".join(reply) == text[:text.find(stop)] and reply.finish_reason == "stop"
    messages = session.messages + [{"role": "user", "content": "why"}]
    expected = complete(model, tokenizer, tokenizer.encode_chat(messages), max_new_tokens=10, temperature=0,
                        end_ids=tokenizer.end_of_turn_ids, stop=stop)
    reply = session.send("why")
    assert ("".join(reply), reply.finish_reason) == expected
    assert counted.prefills == 1
    stop_string = stop in tokenizer.decode(reply.token_ids)
    assert session.tokens == cached_after(tokenizer.encode_chat(messages), reply, stop_string=stop_string)
    assert_cache_is_a_fresh_prefill(session)


def test_reset_forgets_all_but_the_prompt(char_chat):
    model, tokenizer = char_chat
    session = Session(model, tokenizer, prompt="be brief", max_new_tokens=4, temperature=0)
    first = "".join(session.send("the fox"))
    "".join(session.send("why"))
    session.reset()
    assert session.messages == [{"role": "system", "content": "be brief"}] and session.tokens == []
    assert "".join(session.send("the fox")) == first
    assert_cache_is_a_fresh_prefill(session)


def test_settings_are_checked_when_the_session_is_made(char_chat, plain):
    model, tokenizer = char_chat
    from cllm.errors import UsageError
    with pytest.raises(UsageError, match="min_p"):
        Session(model, tokenizer, min_p=2.0)
    with pytest.raises(UsageError, match="max_new_tokens"):
        Session(model, tokenizer, max_new_tokens=-1)
    with pytest.raises(UsageError, match="chat template"):
        Session(*plain, chat=True)
    assert not Session(model, tokenizer, chat=False).chat


# ---------------------------------------------------------------------------------------------------------------
# inference -i and the sampling flags


@pytest.fixture(scope="module")
def chat_path(char_chat, tmp_path_factory):
    path = tmp_path_factory.mktemp("session") / "chat.cllm"
    save_model(path, *char_chat)
    return path


@pytest.fixture(scope="module")
def plain_path(plain, tmp_path_factory):
    path = tmp_path_factory.mktemp("session") / "plain.cllm"
    save_model(path, *plain)
    return path


def chat_reply(model, tokenizer, messages, n):
    return complete(model, tokenizer, tokenizer.encode_chat(messages), max_new_tokens=n, temperature=0,
                    end_ids=tokenizer.end_of_turn_ids)[0]


def test_interactive_chat_answers_each_line_until_the_end_of_input(char_chat, chat_path, monkeypatch, capsys):
    model, tokenizer = char_chat
    monkeypatch.setattr("sys.stdin", io.StringIO("the fox\n\nwhy\n/reset\nthe fox\n"))
    assert inference.main([str(chat_path), "-i", "-p", "be brief", "-n", "6", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox"}]
    first = chat_reply(model, tokenizer, messages, 6)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "why"}]
    second = chat_reply(model, tokenizer, messages, 6)
    # An empty line is no turn; after /reset, the first turn again.
    assert out == f"> {first}\n> > {second}\n> > {first}\n> \n"
    assert "forgotten" in err


def test_interactive_plain_continues_the_document(plain, plain_path, monkeypatch, capsys):
    model, tokenizer = plain
    monkeypatch.setattr("sys.stdin", io.StringIO(" fox\n\n"))
    assert inference.main([str(plain_path), "-i", "-p", "the", "-n", "3", "--temperature", "0"]) == 0
    out, _ = capsys.readouterr()
    first = complete(model, tokenizer, "the fox", max_new_tokens=3, temperature=0)[0]
    second = complete(model, tokenizer, "the fox" + first, max_new_tokens=3, temperature=0)[0]
    assert out == f"> {first}\n> {second}\n> \n"


def test_interactive_ctrl_c_stops_a_reply_and_ends_the_session_at_the_prompt(char_chat, chat_path, monkeypatch,
                                                                             capsys):
    model, tokenizer = char_chat
    step, calls = Decoder.step, []

    def step_interrupted_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    lines = iter(["the fox", "why"])

    def typed(prompt):
        print(prompt, end="")
        line = next(lines, None)
        if line is None:
            raise KeyboardInterrupt  # Ctrl-C at the prompt
        return line

    monkeypatch.setattr(Decoder, "step", step_interrupted_once)
    monkeypatch.setattr("builtins.input", typed)
    assert inference.main([str(chat_path), "-i", "-n", "8", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    messages = [{"role": "user", "content": "the fox"}]
    partial = chat_reply(model, tokenizer, messages, 3)  # the third token was drawn, never fed
    messages += [{"role": "assistant", "content": partial}, {"role": "user", "content": "why"}]
    assert out == f"> {partial}\n> {chat_reply(model, tokenizer, messages, 8)}\n> \n"
    assert "(interrupted)" in err


def test_interactive_notes_a_conversation_cut_to_its_window(plain_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("the fox\n box\n"))
    assert inference.main([str(plain_path), "-i", "-n", "12", "--temperature", "0"]) == 0
    _, err = capsys.readouterr()
    assert "outgrew the context of 16 tokens: it went on from its last 8 tokens" in err


def test_the_penalty_flags_reach_the_generation(plain, plain_path, capsys):
    model, tokenizer = plain
    settings = dict(repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=-0.5, min_p=0.2)
    expected, _ = complete(model, tokenizer, "the", max_new_tokens=10, temperature=0.7, seed=3, **settings)
    plain_only, _ = complete(model, tokenizer, "the", max_new_tokens=10, temperature=0.7, seed=3)
    assert expected != plain_only
    assert inference.main([str(plain_path), "-p", "the", "-n", "10", "--temperature", "0.7", "--seed", "3",
                           "--repetition-penalty", "1.5", "--frequency-penalty", "0.5", "--presence-penalty", "-0.5",
                           "--min-p", "0.2"]) == 0
    assert capsys.readouterr().out == "the" + expected + "\n"


@pytest.mark.parametrize("flags, message", [
    (["--min-p", "1.5"], "argument --min-p: must be a number in [0.0, 1.0], got 1.5"),
    (["--min-p", "x"], "argument --min-p: invalid number value: 'x'"),
    (["--repetition-penalty", "0"], "argument --repetition-penalty: must be a number in (0.0, 10.0], got 0.0"),
    (["--frequency-penalty", "2.5"], "argument --frequency-penalty: must be a number in [-2.0, 2.0], got 2.5"),
    (["--presence-penalty", "nan"], "argument --presence-penalty: must be a number in [-2.0, 2.0], got nan"),
    (["-i", "-f", "-"], "-i reads its turns from standard input"),
    (["-i", "--num-samples", "2"], "--num-samples does not go with -i"),
])
def test_bad_flags_are_one_line_usage_errors(plain_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit:
        inference.main([str(plain_path), *flags])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and err.count("\n") == 1
