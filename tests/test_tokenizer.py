"""Tokenizers: round trips per kind, deterministic streaming training, the JSON form and its errors."""
import json

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from cllm.tokenizer import DEFAULT_VOCAB_SIZE, Tokenizer

CORPUS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
    "All:\n\tSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n",
    "Ünïcödé façade, naïve café: 日本語のテキスト 🙂🚀 and   three spaces.\n",
] * 3


def train(kind, vocab_size=None, texts=CORPUS):
    return Tokenizer.train(kind, iter(texts), vocab_size)


@pytest.fixture(scope="module")
def bpe():
    return train("bpe", 300)


@pytest.mark.parametrize("text", [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\r\n and a lone \r",
    "never seen in training: €, Ω, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, 👩‍👩‍👧‍👦, e\u0301, \x00\x7f",
    "<|endoftext|> typed as text",
])
def test_bpe_round_trips_any_unicode(bpe, text):
    ids = bpe.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert bpe.decode(ids) == text


def test_bpe_vocabulary_holds_every_byte_and_stops_at_vocab_size(bpe):
    assert bpe.vocab_size == 300  # the corpus has far more than 300 - 257 possible merges
    assert bpe.decode([bpe.separator_id]) == "<|endoftext|>"
    # The byte alphabet is seeded: an unseen character costs a few byte tokens, never an unknown token.
    assert len(bpe.encode("€")) == 3


def test_bpe_defaults_to_a_4096_token_vocabulary():
    assert DEFAULT_VOCAB_SIZE["bpe"] == 4096
    big_text = [" ".join(f"word{i} token{i * 7 % 1000}" for i in range(5000))]
    assert train("bpe", None, big_text).vocab_size == 4096


def test_separator_only_comes_from_data_preparation_never_from_text(bpe):
    assert bpe.separator_id not in bpe.encode("a<|endoftext|>b").tolist()


def test_char_round_trips_whitespace_exactly():
    tok = train("char")
    text = "First Citizen:\n\tSpeak,  speak.\n\n🙂"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) == len(text)  # one token per character
    assert tok.vocab_size == len(set("".join(CORPUS))) + 2  # + <|endoftext|> and <unk>
    assert np.all(np.diff(tok.encode("".join(sorted(set("".join(CORPUS)))))) == 1)  # ids in code-point order


def test_char_maps_unseen_characters_to_unk():
    tok = train("char")
    ids = tok.encode("a€e")
    assert len(ids) == 3
    assert tok.decode(ids) == "a<unk>e"


def test_char_vocab_size_keeps_the_most_frequent_characters():
    tok = train("char", 5, ["aaaaa bbbb cc d"])
    assert tok.vocab_size == 5
    assert tok.decode(tok.encode("ab cd")) == "ab <unk><unk>"  # kept: a, b and " " (3 times)


def test_word_lowercases_splits_on_whitespace_and_joins_with_single_spaces():
    tok = train("word")
    ids = tok.encode("First  CITIZEN:\n\tSpeak,")
    assert tok.decode(ids) == "first citizen: speak,"
    assert [tok.decode([i]) for i in range(4)] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert tok.separator_id == 3


def test_word_vocab_size_keeps_the_most_frequent_words():
    tok = train("word", 6, ["the cat the dog the cat bird"])
    assert tok.vocab_size == 6  # 4 special tokens + "the" (3) + "cat" (2)
    assert tok.decode(tok.encode("The cat and the dog")) == "the cat <unk> the <unk>"


@pytest.mark.parametrize("kind", ["bpe", "char", "word"])
def test_training_streams_and_is_deterministic(kind):
    def one_pass():  # a generator can be read once: training must not need the texts twice or all at once
        yield from CORPUS

    first = Tokenizer.train(kind, one_pass(), 280).to_json()
    assert Tokenizer.train(kind, one_pass(), 280).to_json() == first
    assert train(kind, 280, CORPUS[:2]).to_json() != first


@pytest.mark.parametrize("kind", ["bpe", "char", "word"])
def test_json_round_trip(kind):
    tok = train(kind, 300)
    again = Tokenizer.from_json(tok.to_json())
    assert again.kind == kind
    assert again.to_json() == tok.to_json()
    assert (again.vocab_size, again.separator_id) == (tok.vocab_size, tok.separator_id)
    text = CORPUS[1]
    assert np.array_equal(again.encode(text), tok.encode(text))
    assert again.decode(again.encode(text)) == tok.decode(tok.encode(text))


def malformed_documents():
    good = json.loads(train("char").to_json())
    return {
        "not JSON": "{not json",
        "a list": "[1, 2]",
        "another format": json.dumps({**good, "format": "something-else"}),
        "a future version": json.dumps({**good, "version": 99}),
        "an unknown kind": json.dumps({**good, "kind": "sentencepiece"}),
        "a broken HF part": json.dumps({**good, "hf": {"model": "nonsense"}}),
        "no separator token": json.dumps({**good, "kind": "word"}),  # a char vocabulary has no <eos>
    }


@pytest.mark.parametrize("case", malformed_documents())
def test_malformed_json_raises_a_value_error(case):
    with pytest.raises(ValueError) as error:
        Tokenizer.from_json(malformed_documents()[case])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kind, vocab_size, message", [
    ("sentencepiece", None, "unknown tokenizer 'sentencepiece'"),
    ("bpe", 257, "bpe vocab_size must be more than 257"),
    ("word", 4, "word vocab_size must be more than 4"),
])
def test_bad_settings_raise_a_value_error(kind, vocab_size, message):
    with pytest.raises(ValueError, match=message):
        train(kind, vocab_size)


def test_encode_batch_matches_encode(bpe):
    encoded = bpe.encode_batch(CORPUS[:3])
    assert len(encoded) == 3
    for ids, text in zip(encoded, CORPUS):
        assert ids.dtype == np.int32 and np.array_equal(ids, bpe.encode(text))


def test_decode_rejects_ids_outside_the_vocabulary(bpe):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 300\)"):
        bpe.decode([5, 300])


def test_a_separator_of_its_own_is_recorded_as_version_2_and_none_as_version_1():
    trained = Tokenizer.train("bpe", ["the cat sat on the mat. "] * 20, vocab_size=300)
    hf = HFTokenizer.from_str(trained.hf_json())
    hf.add_special_tokens(["</s>"])
    llama_like = Tokenizer("bpe", hf, separator="</s>")
    doc, plain = json.loads(llama_like.to_json()), json.loads(trained.to_json())
    assert (doc["version"], doc["separator"]) == (2, "</s>")
    assert plain["version"] == 1 and "separator" not in plain  # as every cllm before separators wrote it
    back = Tokenizer.from_json(llama_like.to_json())
    assert back.separator == "</s>" and back.separator_id == llama_like.separator_id == hf.token_to_id("</s>")
