"""sentence-transformers' files in a Hugging Face folder: how an embedding model such as Qwen3-Embedding says it is
to be used, read into cllm's EmbeddingConfig (cllm.embedding_config) and written back from it.

A folder that sentence-transformers loads as an embedding model lists its modules in `modules.json`: the
Transformer (the folder's own model, path ""), a Pooling module (`1_Pooling/config.json`: which hidden states make
the vector) and, optionally, a Normalize module (unit length). `config_sentence_transformers.json` names its
prompts, the instructions put before a text, and the default one. Reading takes those, as sentence-transformers
6 and earlier versions write them:

- the pooling: `pooling_mode` ("lasttoken", "mean"), or earlier versions' `pooling_mode_*` flags (none set is
  mean, as sentence-transformers reads it); "lasttoken" is cllm's "last";
- whether the vector is normalized: a Normalize module after the Pooling;
- the prompts and default_prompt_name.

What cllm would compute differently is refused with one line naming it, rather than embedded otherwise: a pooling
cllm does not compute (cls, max, mean_sqrt_len_tokens, weightedmean) or several concatenated, a pooling width other
than the model's, mean pooling that leaves the prompt out (include_prompt false), any other module (Dense, ...) or
another order, a Transformer elsewhere than the folder itself, and a Transformer that lower-cases texts
(do_lower_case), is not a feature extractor, or renders texts through the chat template (a "message" modality).
A folder without modules.json declares nothing (sentence-transformers would pool it by its mean, cllm's default).

Writing gives the files in the form that Qwen3-Embedding ships and every sentence-transformers version reads
(module types under `sentence_transformers.models`, the pooling as `pooling_mode_*` flags), with a
sentence_bert_config.json whose max_seq_length is the model's context, so that `SentenceTransformer(folder)`
embeds as cllm does. The tokenizer must then pad batches: tokenizer_config.json names the separator as its
pad_token (the padding is never attended to, whichever side sentence-transformers pads).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_write_bytes
from ..embedding_config import EmbeddingConfig
from ..errors import UsageError
from ..model_file_errors import ModelFileError
from ..tokenizer import Tokenizer

MODULES, PROMPTS, TRANSFORMER_SETTINGS = \
    "modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"
MODULE_CONFIG = "config.json"  # inside a module's folder
POOLING_FOLDER, NORMALIZE_FOLDER = "1_Pooling", "2_Normalize"
# The module layouts cllm computes, by class name: sentence-transformers' own classes under any of its versions'
# module paths (sentence_transformers.models.Pooling, sentence_transformers.sentence_transformer.modules.Pooling).
LAYOUTS = (("Transformer", "Pooling"), ("Transformer", "Pooling", "Normalize"))
# sentence-transformers' pooling modes -> cllm's (cllm.pooling.POOLINGS)
POOLINGS = {"mean": "mean", "lasttoken": "last"}
# Earlier versions' flags, in the order sentence-transformers concatenates their vectors
POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


class SentenceTransformersFolderError(ModelFileError):
    """A folder's sentence-transformers files that cllm cannot follow faithfully; the message names the file."""


# --------------------------------------------------------------------------------------------------------------
# reading


def read_embedding_config(folder: Path, dim: int) -> EmbeddingConfig | None:
    """What the folder's sentence-transformers files declare, for a model of width dim; None without modules.json."""
    path = folder / MODULES
    if not path.is_file():
        return None
    modules = _read_json(path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) and isinstance(m.get("type"), str)
                                                and isinstance(m.get("path", ""), str) for m in modules):
        raise SentenceTransformersFolderError(f"{path}: not a list of modules, each with a type and a path")
    layout = tuple(_class_name(m["type"]) for m in modules)
    if layout not in LAYOUTS:
        listed = ", ".join(m["type"][:80] for m in modules[:6])
        raise SentenceTransformersFolderError(
            f"{path}: lists the modules {listed}; cllm computes a Transformer, a Pooling and optionally a Normalize, "
            f"in that order")
    if modules[0].get("path", "") not in ("", "."):
        raise SentenceTransformersFolderError(f"{path}: the Transformer module is in {modules[0]['path'][:80]!r}; "
                                              f"cllm reads the model of the folder itself")
    _check_transformer_settings(folder / TRANSFORMER_SETTINGS)
    pooling = _pooling(folder, modules[1].get("path", ""), dim)
    prompts, default_prompt_name = _prompts(folder / PROMPTS)
    try:
        return EmbeddingConfig(pooling, normalize=len(layout) == 3, prompts=prompts,
                               default_prompt_name=default_prompt_name)
    except UsageError as e:
        raise SentenceTransformersFolderError(f"{folder / PROMPTS}: {e}") from None


def _class_name(module_type: str) -> str | None:
    """The sentence-transformers class a module type names, or None for another package's (custom code)."""
    package, _, name = module_type.rpartition(".")
    return name if package.split(".")[0] == "sentence_transformers" else None


def _check_transformer_settings(path: Path) -> None:
    """Refuses the Transformer settings under which sentence-transformers reads a text otherwise than cllm."""
    if not path.is_file():
        return
    settings = _read_json(path)
    if not isinstance(settings, dict):
        raise SentenceTransformersFolderError(f"{path}: not a JSON object")
    if settings.get("do_lower_case", False) is not False:
        raise SentenceTransformersFolderError(f"{path}: do_lower_case lower-cases every text, which cllm does not")
    task = settings.get("transformer_task", "feature-extraction")
    if task != "feature-extraction":
        raise SentenceTransformersFolderError(f"{path}: transformer_task {json.dumps(task)[:80]} is not one cllm "
                                              f"computes (it pools hidden states: \"feature-extraction\")")
    modalities = settings.get("modality_config") or {}
    if not isinstance(modalities, dict) or "message" in modalities:
        raise SentenceTransformersFolderError(f"{path}: modality_config renders texts through the chat template, "
                                              f"which cllm does not do for embeddings")


def _pooling(folder: Path, module_path: str, dim: int) -> str:
    """cllm's name of the pooling the Pooling module's config declares."""
    if Path(module_path).name != module_path or module_path in ("", ".", ".."):
        raise SentenceTransformersFolderError(f"{folder / MODULES}: the Pooling module's path {module_path[:80]!r} "
                                              f"is not a folder in {folder}")
    path = folder / module_path / MODULE_CONFIG
    if not path.is_file():
        raise SentenceTransformersFolderError(f"{path}: missing (the Pooling module's settings)")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise SentenceTransformersFolderError(f"{path}: not a JSON object")
    width = config.get("embedding_dimension", config.get("word_embedding_dimension", dim))
    if width != dim:
        raise SentenceTransformersFolderError(f"{path}: pools vectors of {json.dumps(width)[:40]} values, but the "
                                              f"model's hidden states have {dim}")
    modes = _pooling_modes(path, config)
    if len(modes) != 1:
        raise SentenceTransformersFolderError(f"{path}: declares the poolings {', '.join(modes)}, concatenated; cllm "
                                              f"computes one of {' and '.join(POOLINGS)}")
    mode = modes[0]
    if mode not in POOLINGS:
        raise SentenceTransformersFolderError(f"{path}: pooling {mode[:40]!r} is not one cllm computes (it computes "
                                              f"{' and '.join(POOLINGS)})")
    if mode == "mean" and config.get("include_prompt", True) is not True:
        raise SentenceTransformersFolderError(f"{path}: include_prompt false leaves the prompt's tokens out of the "
                                              f"mean; cllm's mean counts every token")
    return POOLINGS[mode]


def _pooling_modes(path: Path, config: dict) -> list[str]:
    """The modes a Pooling config declares: pooling_mode (a name or a list of names), else the flags set."""
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else modes
        if not isinstance(modes, list) or not modes or not all(isinstance(mode, str) for mode in modes):
            raise SentenceTransformersFolderError(f"{path}: pooling_mode must be a name or a list of names, got "
                                                  f"{json.dumps(config['pooling_mode'])[:80]}")
        return modes
    return [mode for flag, mode in POOLING_FLAGS.items() if config.get(flag)] or ["mean"]


def _prompts(path: Path) -> tuple[dict, str | None]:
    """The prompts and the default prompt's name (a prompt of null is "", as sentence-transformers takes it)."""
    if not path.is_file():
        return {}, None
    config = _read_json(path)
    if not isinstance(config, dict):
        raise SentenceTransformersFolderError(f"{path}: not a JSON object")
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict):
        raise SentenceTransformersFolderError(f"{path}: prompts must be an object of names and prompts")
    return {name: "" if text is None else text for name, text in prompts.items()}, config.get("default_prompt_name")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SentenceTransformersFolderError(f"{path}: unreadable ({e})") from None


# --------------------------------------------------------------------------------------------------------------
# writing


def padding_settings(tokenizer: Tokenizer) -> dict:
    """tokenizer_config.json's settings that an embedding model's folder adds: a pad token, since
    sentence-transformers pads the texts of a batch to one length."""
    return {} if tokenizer.embedding is None else {"pad_token": tokenizer.separator}


def save_embedding_config(folder: Path, tokenizer: Tokenizer, dim: int, context_length: int) -> list[Path]:
    """Writes the sentence-transformers files of the tokenizer's embedding config (none if it has none); returns
    the files written."""
    embedding = tokenizer.embedding
    if embedding is None:
        return []
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": POOLING_FOLDER, "type": "sentence_transformers.models.Pooling"}]
    if embedding.normalize:
        modules.append({"idx": 2, "name": "2", "path": NORMALIZE_FOLDER,
                        "type": "sentence_transformers.models.Normalize"})
    mode = next(mode for mode, ours in POOLINGS.items() if ours == embedding.pooling)
    pooling = {"word_embedding_dimension": dim,
               **{flag: flag_mode == mode for flag, flag_mode in POOLING_FLAGS.items()}, "include_prompt": True}
    files = {
        MODULES: modules,
        f"{POOLING_FOLDER}/{MODULE_CONFIG}": pooling,
        TRANSFORMER_SETTINGS: {"max_seq_length": context_length, "do_lower_case": False},
        PROMPTS: {"prompts": embedding.prompts, "default_prompt_name": embedding.default_prompt_name},
    }
    (folder / POOLING_FOLDER).mkdir(exist_ok=True)
    for name, content in files.items():
        atomic_write_bytes(folder / name, (json.dumps(content, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return [folder / name for name in files]
