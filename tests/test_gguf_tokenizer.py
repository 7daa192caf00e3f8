"""A GGUF file's tokenizer (cllm.formats.gguf_tokenizer): what cllm's own exporter writes reads back to the same
ids, decoding, separator and chat template; transformers, which builds a tokenizer from the same metadata, gives
the same ids; llama.cpp's pre-tokenizers split as its regexes do; and a file that cannot be read faithfully is
refused in one line naming the key. Every tokenizer and file is built here, offline."""
from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers",
                                   reason="the peer checks need transformers: pip install -e \".[interop]\"")

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

from cllm.chat import ChatTemplate  # noqa: E402
from cllm.formats.gguf_file import save_gguf  # noqa: E402
from cllm.formats.gguf_tokenizer import PRE_TOKENIZERS, read_gguf_tokenizer  # noqa: E402
from cllm.model import GPT, ModelConfig  # noqa: E402
from cllm.model_file_errors import ModelFileError  # noqa: E402
from cllm.tokenizer import Tokenizer  # noqa: E402
from tests.chat_models import INJECTIONS, TEXT, ZEPHYR, chat_tokenizer, zephyr_tokenizer  # noqa: E402
from tests.test_llama_interop import gguf_fields, smollm2_tokenizer, tinyllama_tokenizer  # noqa: E402

KEY = gguf.Keys.Tokenizer
CORPUS = [
    "Hello, world! This is a test.", "  two leading spaces, and trailing ones   ", "tabs\tand\nnew\r\nlines\n\n\n",
    "digits 0 12 345 6789 3.14159 1,000,000 and ١٢٣", "naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 🙂🎉👩‍💻 and symbols ©®™ ½ → ≠ $5+3=<8>^~|", "def f(x):\n    return {'a': x ** 2}  # done\n",
    "contractions: don't, I'll, WE'RE, she's, 'ſt", "a  b   c    d\u00a0e\u3000f",
    # special tokens' text stays text in encode(): cllm keeps user text literal
    "<|endoftext|> <|im_start|>user\nhi<|im_end|> <s> </s> <unk> <|user|>", "", " ", "\n", "x",
] + sorted(set(TEXT))
_WORDS = " ".join(TEXT + CORPUS).split(" ")
# and lines of those words in a random order, so that a vocabulary learns many pieces that can be cut several ways
TRAINING = TEXT + CORPUS * 5 + [" ".join(random.Random(i).choices(_WORDS, k=12)) for i in range(400)]
MESSAGES = [{"role": "user", "content": "Hello 123, 'tis   me 🙂"}, {"role": "assistant", "content": " Hi!\n"},
            {"role": "user", "content": INJECTIONS["chatml"] + INJECTIONS["zephyr"]}]


def read(path) -> Tokenizer:
    return read_gguf_tokenizer(gguf.GGUFReader(path), path)


def export(path, tokenizer: Tokenizer, arch: str = "llama", extra_rows: int = 3):
    """tokenizer in the GGUF file of a small random model whose embedding has extra_rows beyond its vocabulary."""
    heads = {"n_heads": 2} if arch == "gpt2" else {"n_heads": 2, "n_kv_heads": 1}
    config = ModelConfig(arch=arch, vocab_size=tokenizer.vocab_size + extra_rows, context_length=16, dim=16,
                         n_layers=1, **heads)
    return save_gguf(path, GPT(config, seed=0), tokenizer)


def trained() -> Tokenizer:
    return Tokenizer.train("bpe", TRAINING, vocab_size=1500)


def smollm2_chat() -> Tokenizer:
    """SmolLM2-Instruct's kind: digits split one by one, ChatML's special tokens and template."""
    chat = chat_tokenizer()
    return Tokenizer("bpe", smollm2_tokenizer(), separator=chat.separator, chat_template=chat.chat_template)


def tinyllama(chat_template: ChatTemplate | None = None) -> Tokenizer:
    """A BPE built as TinyLlama's is (tests.test_llama_interop.tinyllama_tokenizer): <unk>, <s>, </s>, the 256 byte
    tokens, then pieces learned with "▁" for spaces and before the text; <s> before every text. Learned here from
    the varied TRAINING (but for the special tokens' text, which sentencepiece never learns as pieces), and large
    enough that many tokens can be cut into two others in more ways than the merge that made them."""
    hf = tinyllama_tokenizer([text for text in TRAINING if "<" not in text], vocab_size=1500)
    return Tokenizer("bpe", hf, separator="</s>", chat_template=chat_template)


def tinyllama_chat() -> Tokenizer:
    """TinyLlama-Chat's kind: its markers are text, and only </s> (which its Zephyr template writes) is special."""
    return tinyllama(ChatTemplate(ZEPHYR, bos_token="<s>", eos_token="</s>"))


# What cllm's exporter writes for each: llama.cpp's tokenizer model and pre-tokenizer.
EXPORTS = {"trained": (trained, "gpt2", ("gpt2", "gpt-2")), "chatml": (chat_tokenizer, "gpt2", ("gpt2", "gpt-2")),
           "zephyr": (zephyr_tokenizer, "llama", ("gpt2", "gpt-2")),
           "smollm2": (smollm2_chat, "llama", ("gpt2", "smollm")),
           "tinyllama": (tinyllama, "llama", ("llama", "default")),
           "tinyllama-chat": (tinyllama_chat, "llama", ("llama", "default"))}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (the original tokenizer, its GGUF file); each file written once."""
    folder = tmp_path_factory.mktemp("exports")
    files = {}
    for name, (build, arch, _) in EXPORTS.items():
        tokenizer = build()
        files[name] = tokenizer, export(folder / f"{name}.gguf", tokenizer, arch)
    return files


# ---------------------------------------------------------------------------------------------------------------
# round trips through cllm's own exporter


@pytest.mark.parametrize("name", EXPORTS)
def test_an_export_reads_back_to_the_same_ids_decoding_separator_and_template(exported, name):
    original, path = exported[name]
    fields = gguf_fields(gguf.GGUFReader(path))
    assert (fields[KEY.MODEL], fields[KEY.PRE]) == EXPORTS[name][2]
    ours = read(path)
    for text in CORPUS:
        ids = original.encode(text)
        np.testing.assert_array_equal(ours.encode(text), ids, err_msg=repr(text))
        assert ours.decode(ids) == original.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == original.decode(ids, skip_special_tokens=True)
    assert ours.encode_batch(CORPUS[:3])[1].tolist() == original.encode(CORPUS[1]).tolist()
    assert (ours.separator, ours.separator_id) == (original.separator, original.separator_id)
    chat = original.chat_template
    if chat is not None and not chat.bos_token:
        # a file always names a bos token, and llama.cpp renders a template with its text: Zephyr's reads back with it
        chat = dataclasses.replace(chat, bos_token=fields[KEY.LIST][fields[KEY.BOS_ID]])
    assert ours.chat_template == chat
    if chat is not None:
        assert ours.chat_template.render(MESSAGES) == chat.render(MESSAGES)
    assert ours.end_of_turn_ids == original.end_of_turn_ids
    # every row of the model's embedding has a token, the exporter's placeholders beyond the vocabulary included
    vocab = ours.vocab()
    assert ours.vocab_size == original.vocab_size + 3 and vocab[f"[PAD{original.vocab_size}]"] == original.vocab_size
    assert all(vocab[token] == i for token, i in original.vocab().items())


@pytest.mark.parametrize("name", ["trained", "smollm2", "tinyllama"])
def test_a_file_read_writes_back_to_a_file_that_reads_the_same(tmp_path, exported, name):
    _, path = exported[name]
    ours = read(path)
    again = read(export(tmp_path / "again.gguf", ours, EXPORTS[name][1], extra_rows=0))
    for text in CORPUS:
        np.testing.assert_array_equal(again.encode(text), ours.encode(text), err_msg=repr(text))
    assert again.vocab() == ours.vocab() and again.chat_template == ours.chat_template
    before, after = tokenizer_fields(path), tokenizer_fields(tmp_path / "again.gguf")
    assert {key: after.get(key) for key in (KEY.MODEL, KEY.PRE, KEY.MERGES, KEY.BOS_ID, KEY.EOS_ID, KEY.ADD_BOS)} \
        == {key: before.get(key) for key in (KEY.MODEL, KEY.PRE, KEY.MERGES, KEY.BOS_ID, KEY.EOS_ID, KEY.ADD_BOS)}


def test_a_tokenizer_read_saves_in_a_cllm_file_as_it_is(exported):
    for name in ("smollm2", "tinyllama"):
        ours = read(exported[name][1])
        saved = Tokenizer.from_json(ours.to_json())
        assert [saved.encode(text).tolist() for text in CORPUS] == [ours.encode(text).tolist() for text in CORPUS]
        assert saved.chat_template == ours.chat_template and saved.separator == ours.separator


def test_byte_level_text_round_trips_exactly(exported):
    for name in ("trained", "smollm2"):
        ours = read(exported[name][1])
        for text in CORPUS:
            assert ours.decode(ours.encode(text)) == text


def test_sentencepiece_text_round_trips_after_its_leading_token(exported):
    ours = read(exported["tinyllama"][1])
    for text in CORPUS:
        ids = ours.encode(text)
        assert ids[0] == ours.vocab()["<s>"]  # add_bos_token
        assert ours.decode(ids[1:]) == text


@pytest.mark.parametrize("name", ["chatml", "zephyr", "smollm2", "tinyllama-chat"])
def test_a_chat_tokenizes_as_the_original_markup_parsed_and_messages_literal(exported, name):
    original, path = exported[name]
    ours = read(path)
    for add_generation_prompt in (True, False):
        np.testing.assert_array_equal(ours.encode_chat(MESSAGES, add_generation_prompt=add_generation_prompt),
                                      original.encode_chat(MESSAGES, add_generation_prompt=add_generation_prompt))
    markup = ["<|im_start|>", "<|im_end|>"] if name in ("chatml", "smollm2") else ["</s>"]
    special = {ours.vocab()[token] for token in markup}
    assert special & set(ours.encode_chat(MESSAGES).tolist())
    assert not special & set(ours.encode(INJECTIONS["chatml"] + INJECTIONS["zephyr"]).tolist())


def test_the_exporter_names_the_chat_templates_bos_and_end_of_turn(exported):
    fields = gguf_fields(gguf.GGUFReader(exported["chatml"][1]))
    original = exported["chatml"][0]
    vocab = original.vocab()
    assert fields[KEY.BOS_ID] == vocab["<|im_start|>"] and fields[KEY.EOT_ID] == vocab["<|im_end|>"]
    assert fields[KEY.EOS_ID] == original.separator_id


def test_user_defined_tokens_are_matched_in_text_as_llama_cpp_matches_them(tmp_path):
    hf = HFTokenizer.from_str(trained().hf_json())
    hf.add_tokens(["<think>"])  # an added token that is not special: llama.cpp's user-defined type
    original = Tokenizer("bpe", hf)
    path = export(tmp_path / "m.gguf", original, "gpt2")
    types = gguf_fields(gguf.GGUFReader(path))[KEY.TOKEN_TYPE]
    think = original.vocab()["<think>"]
    assert types[think] == gguf.TokenType.USER_DEFINED
    ours = read(path)
    text = "a<think>b <|endoftext|>"
    assert think in ours.encode(text).tolist() and ours.separator_id not in ours.encode(text).tolist()
    np.testing.assert_array_equal(ours.encode(text), original.encode(text))


# ---------------------------------------------------------------------------------------------------------------
# against transformers, which builds its tokenizer from the same metadata


def transformers_ids(path, texts) -> list[list[int]]:
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # split_special_tokens: special tokens' text stays text, as cllm's encode() keeps it
    return [theirs(text, split_special_tokens=True)["input_ids"] for text in texts]


@pytest.mark.parametrize("name", EXPORTS)
def test_transformers_gives_the_same_ids(exported, name):
    _, path = exported[name]
    texts = CORPUS
    if EXPORTS[name][2][0] == "llama":
        # transformers marks a sentencepiece text's start with Metaspace, which adds no "▁" before a text that
        # starts with a space; llama.cpp (and sentencepiece) always add one, and so does cllm.
        texts = [text for text in CORPUS if not text[:1].isspace()]
    ours = read(path)
    assert [ours.encode(text).tolist() for text in texts] == transformers_ids(path, texts)


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp's other byte-level pre-tokenizers, in files written here as llama.cpp's converter writes them

LLAMA3_HF_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]


def split_bpe(regex: str) -> HFTokenizer:
    """A byte-level BPE whose pieces are split by regex, as Llama 3's and Qwen2's tokenizer.json split them."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(TRAINING, trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS,
                                                         show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return hf


def tokenizer_fields(path) -> dict:
    return {key: value for key, value in gguf_fields(gguf.GGUFReader(path)).items() if key.startswith("tokenizer.")}


def write_metadata(path, fields: dict) -> None:
    """A GGUF file of a llama model's tokenizer alone, each value written with the type llama.cpp reads it as."""
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in fields.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif key == KEY.SCORES:
            writer.add_array(key, [float(v) for v in value])
        else:
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


def byte_level_file(path, hf: HFTokenizer, pre: str, **extra):
    model = json.loads(hf.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    types = [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    write_metadata(path, {KEY.MODEL: "gpt2", KEY.PRE: pre, KEY.LIST: tokens, KEY.TOKEN_TYPE: types,
                          KEY.MERGES: [m if isinstance(m, str) else " ".join(m) for m in model["merges"]],
                          KEY.BOS_ID: 0, KEY.EOS_ID: 1, **extra})
    return path


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_llama3_and_qwen2_files_give_transformers_ids(tmp_path, pre):
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_HF_REGEX
    hf = split_bpe(LLAMA3_HF_REGEX if pre == "llama-bpe" else QWEN2_HF_REGEX)
    path = byte_level_file(tmp_path / "m.gguf", hf, pre, **{KEY.ADD_BOS: pre == "llama-bpe"})
    ours = read(path)
    assert [ours.encode(text).tolist() for text in CORPUS] == transformers_ids(path, CORPUS)
    hf.encode_special_tokens = True
    # the tokenizer the vocabulary was trained as, with llama.cpp's leading <|begin_of_text|> for Llama 3
    bos = [0] if pre == "llama-bpe" else []
    assert [ours.encode(text).tolist() for text in CORPUS] == [bos + hf.encode(text).ids for text in CORPUS]


def test_a_qwen2_tokenizer_exports_as_llama_cpps_qwen2_and_reads_back_to_its_ids(tmp_path):
    """Qwen's tokenizer.json (Qwen2.5's, Qwen3's): NFC, then Qwen2's regex with (?i:) contractions, then the bytes
    spelled. llama.cpp's converter writes it as pre-tokenizer qwen2, which applies no normalizer and spells the
    contractions case by case; so does cllm's exporter. The two part only on text not in NFC (none here) and on
    "ſ", which (?i:) folds to "s"."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_HF_REGEX
    hf = split_bpe(QWEN2_HF_REGEX)
    hf.normalizer = normalizers.NFC()
    original = Tokenizer("bpe", hf, separator="<|end_of_text|>")
    path = export(tmp_path / "qwen.gguf", original, "qwen2", extra_rows=0)
    assert tokenizer_fields(path)[KEY.PRE] == "qwen2"
    ours = read(path)
    for text in CORPUS:
        if "ſ" not in text:
            assert ours.encode(text).tolist() == original.encode(text).tolist(), text
    assert pieces(original, "'ſt") == ["'ſ", "t"] and pieces(ours, "'ſt") == ["'ſt"]
    # what was read (llama.cpp's spelling) writes back as qwen2 too, to the same file
    again = export(tmp_path / "again.gguf", ours, "qwen2", extra_rows=0)
    assert tokenizer_fields(again) == tokenizer_fields(path)


def test_llama3s_pre_tokenizer_adds_bos_unless_the_file_says_not_to(tmp_path):
    hf = split_bpe(LLAMA3_HF_REGEX)
    assert read(byte_level_file(tmp_path / "a.gguf", hf, "llama-bpe")).encode("hi").tolist()[0] == 0
    assert read(byte_level_file(tmp_path / "b.gguf", hf, "llama-bpe", **{KEY.ADD_BOS: False})).encode(
        "hi").tolist()[0] != 0


def test_llama3s_pre_tokenizer_takes_a_piece_that_is_a_token_whole(tmp_path):
    # "abc" is a token, but merging by rank makes "a" + "bc" of it, which no merge joins (llama.cpp's ignore_merges)
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["bc", "ab", "abc", "<|end_of_text|>"]
    fields = {KEY.MODEL: "gpt2", KEY.LIST: tokens, KEY.MERGES: ["b c", "a b", "ab c"], KEY.EOS_ID: len(tokens) - 1,
              KEY.ADD_BOS: False}
    write_metadata(tmp_path / "a.gguf", fields | {KEY.PRE: "llama-bpe"})
    write_metadata(tmp_path / "b.gguf", fields | {KEY.PRE: "gpt-2"})
    assert read(tmp_path / "a.gguf").encode("abc").tolist() == [tokens.index("abc")]
    assert read(tmp_path / "b.gguf").encode("abc").tolist() == [tokens.index("a"), tokens.index("bc")]


def pieces(tokenizer: Tokenizer, text: str) -> list[str]:
    """How the tokenizer splits text before merging, each piece in plain text."""
    hf = HFTokenizer.from_str(tokenizer.hf_json())
    byte_level = decoders.ByteLevel()
    return [byte_level.decode([piece]) for piece, _ in hf.pre_tokenizer.pre_tokenize_str(text)]


# Pieces worked out by hand from llama.cpp's regexes (llm_tokenizer_bpe), applied in turn.
SPLITS = {
    "gpt-2": ("I've 12345 apples+pears!!  ok\n", ["I", "'ve", " 12345", " apples", "+", "pears", "!!", " ", " ok",
                                                  "\n"]),
    "smollm": ("I've 12345 apples+pears!!  ok\n", ["I", "'ve", " ", "1", "2", "3", "4", "5", " apples", "+",
                                                   "pears", "!!", " ", " ok", "\n"]),
    # default: runs of punctuation (and $+<=>^~|) first, then GPT-2's regex, then numbers, then three ASCII digits
    "default": ("x+=1234567 (ab), 'tis", ["x", "+=", "123", "456", "7", " ", "(", "ab", "),", " ", "'", "tis"]),
    "llama-bpe": ("I'VE 12345 apples!!\n\n  ok", ["I", "'VE", " ", "123", "45", " apples", "!!\n\n", " ", " ok"]),
    "qwen2": ("I'VE 12345 apples!!\n\n  ok", ["I", "'VE", " ", "1", "2", "3", "4", "5", " apples", "!!\n\n", " ",
                                               " ok"]),
}


@pytest.mark.parametrize("pre", PRE_TOKENIZERS)
def test_each_pre_tokenizer_splits_as_llama_cpps_regexes(tmp_path, pre):
    text, expected = SPLITS[pre]
    ours = read(byte_level_file(tmp_path / "m.gguf", split_bpe(LLAMA3_HF_REGEX), pre))
    assert pieces(ours, text) == expected


def test_llama_cpps_other_names_for_a_pre_tokenizer_read_as_it(tmp_path):
    hf = split_bpe(LLAMA3_HF_REGEX)
    canonical = read(byte_level_file(tmp_path / "a.gguf", hf, "llama-bpe"))
    other = read(byte_level_file(tmp_path / "b.gguf", hf, "llama3"))
    assert [other.encode(text).tolist() for text in CORPUS] == [canonical.encode(text).tolist() for text in CORPUS]


# ---------------------------------------------------------------------------------------------------------------
# sentencepiece's settings


def test_a_sentencepiece_file_without_ids_takes_llama_cpps_defaults(tmp_path, tinyllama_fields):
    fields = {key: value for key, value in tinyllama_fields.items()
              if key not in (KEY.BOS_ID, KEY.EOS_ID, KEY.UNK_ID, KEY.ADD_BOS)}
    write_metadata(tmp_path / "m.gguf", fields)
    ours = read(tmp_path / "m.gguf")
    assert ours.encode("hi").tolist()[0] == 1 and (ours.separator, ours.separator_id) == ("</s>", 2)


def test_add_eos_token_ends_every_text_and_add_space_prefix_false_marks_no_start(tmp_path, exported,
                                                                                 tinyllama_fields):
    write_metadata(tmp_path / "a.gguf", tinyllama_fields | {KEY.ADD_EOS: True})
    ends = read(tmp_path / "a.gguf")
    assert ends.encode_for_embedding(["To be"])[0].tolist()[-1] == 2 and ends.encode("To be").tolist()[-1] != 2
    write_metadata(tmp_path / "b.gguf", tinyllama_fields | {KEY.ADD_PREFIX: False})
    unmarked, marked = read(tmp_path / "b.gguf"), read(exported["tinyllama"][1])
    for text in filter(None, CORPUS):  # (an empty text has no start to mark)
        assert unmarked.encode(" " + text).tolist() == marked.encode(text).tolist()
        assert unmarked.decode(unmarked.encode(text)[1:]) == text


# ---------------------------------------------------------------------------------------------------------------
# end of turn


def test_the_end_of_turn_is_the_eot_token_or_the_one_llama_cpp_knows_by_its_text(tmp_path, exported):
    fields = tokenizer_fields(exported["chatml"][1])
    im_end = fields[KEY.LIST].index("<|im_end|>")
    del fields[KEY.EOT_ID]  # as a file converted by llama.cpp from SmolLM2's folder has it
    write_metadata(tmp_path / "a.gguf", fields)
    assert read(tmp_path / "a.gguf").end_of_turn_ids == (im_end,)
    write_metadata(tmp_path / "b.gguf", fields | {KEY.CHAT_TEMPLATE: "{{ messages[0]['content'] }}"})
    assert read(tmp_path / "b.gguf").end_of_turn_ids == ()  # the template writes no end of turn: the eos ends it


# ---------------------------------------------------------------------------------------------------------------
# refusals


@pytest.fixture(scope="module")
def tinyllama_fields(exported) -> dict:
    return tokenizer_fields(exported["tinyllama"][1])


@pytest.mark.parametrize("key, change, reason", [  # n: the number of tokens
    (KEY.MODEL, lambda _, n: "bert", "'bert' is not a tokenizer cllm reads"),
    (KEY.SCORES, lambda scores, n: scores[:-1], "has {m} entries for {n} tokens"),
    (KEY.TOKEN_TYPE, lambda types, n: types + [1], "has {p} entries for {n} tokens"),
    (KEY.TOKEN_TYPE, lambda types, n: [0] + types[1:], "gives token 0 the type 0"),
    (KEY.LIST, lambda tokens, n: tokens[:1] + tokens[:-1], "holds '<unk>' twice"),
    (KEY.EOS_ID, lambda _, n: n, "is {n}, not a token of the {n}"),
])
def test_a_file_that_cannot_be_read_faithfully_is_refused_in_one_line_naming_the_key(
        tmp_path, tinyllama_fields, key, change, reason):
    fields = dict(tinyllama_fields)
    n = len(fields[KEY.LIST])
    fields[key] = change(fields[key], n)
    write_metadata(tmp_path / "m.gguf", fields)
    with pytest.raises(ModelFileError, match=f"^{tmp_path / 'm.gguf'}: {key} {reason.format(n=n, m=n - 1, p=n + 1)}") \
            as e:
        read(tmp_path / "m.gguf")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key, value, reason", [
    (KEY.PRE, "deepseek-llm", "'deepseek-llm' is a pre-tokenizer cllm does not split as llama.cpp does"),
    (KEY.MERGES, ["a"], "holds 'a', which is not two tokens apart by a space"),
    (KEY.MERGES, ["x y"], "does not make a tokenizer"),
    (KEY.ADD_BOS, True, None),
])
def test_byte_level_files_are_refused_by_name(tmp_path, key, value, reason):
    path = byte_level_file(tmp_path / "m.gguf", split_bpe(LLAMA3_HF_REGEX), "gpt-2", **{key: value})
    if reason is None:  # add_bos_token with a bos token named reads fine
        assert read(path).encode("a").tolist()[0] == 0
        return
    with pytest.raises(ModelFileError, match=f"{key} {reason}") as e:
        read(path)
    assert "\n" not in str(e.value)


def test_a_chat_template_that_is_not_jinja_is_refused_naming_it(tmp_path, tinyllama_fields):
    write_metadata(tmp_path / "m.gguf", tinyllama_fields | {KEY.CHAT_TEMPLATE: "{% for %}"})
    with pytest.raises(ModelFileError, match=f"{KEY.CHAT_TEMPLATE} the model's chat template is not valid Jinja"):
        read(tmp_path / "m.gguf")


def test_a_missing_key_or_one_of_another_type_is_named(tmp_path, tinyllama_fields):
    fields = dict(tinyllama_fields)
    del fields[KEY.SCORES]
    write_metadata(tmp_path / "a.gguf", fields)
    with pytest.raises(ModelFileError, match=f"{KEY.SCORES} is missing"):
        read(tmp_path / "a.gguf")
    write_metadata(tmp_path / "b.gguf", tinyllama_fields | {KEY.MODEL: ["llama"]})
    with pytest.raises(ModelFileError, match=f"{KEY.MODEL} is an array of STRING, not STRING"):
        read(tmp_path / "b.gguf")
