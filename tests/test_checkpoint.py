""".cllm model files and training state: round trips, atomic writes, and one clear error for every kind of bad
file. Bad files are crafted here with safetensors directly, bypassing save_model's own checks."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import safetensors.numpy

from cllm import atomic
from cllm.atomic import atomic_write_bytes
from cllm.checkpoint import (ModelFileError, load_model, load_state, read_metadata,
                             save_model, save_state)
from cllm.model import GPT, ModelConfig
from cllm.optim import AdamW
from cllm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train("char", ["hello world, a tiny corpus"])


@pytest.fixture
def model(tokenizer):
    return GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=8, dim=8, n_layers=2, n_heads=2),
               seed=7)


def assert_one_line_error(excinfo, path, fragment):
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(path) in message
    assert fragment in message, message


# ---------------------------------------------------------------------------------------------------------------
# model files


def test_model_round_trip(tmp_path, model, tokenizer):
    path = tmp_path / "m.cllm"
    save_model(path, model, tokenizer, metadata={"step": "12"})
    loaded, loaded_tokenizer = load_model(path, threads=2)
    assert loaded.config == model.config and loaded.threads == 2
    assert np.array_equal(loaded.params, model.params)
    assert loaded_tokenizer.to_json() == tokenizer.to_json()
    tokens = np.array([[1, 2, 3, 4]], np.int32)
    assert np.array_equal(loaded.logits(tokens), model.logits(tokens))
    metadata = read_metadata(path)
    assert metadata["step"] == "12" and metadata["format"] == "cllm" and metadata["format_version"] == "1"
    assert json.loads(metadata["config"]) == model.config.to_dict()


def test_model_file_is_plain_safetensors(tmp_path, model, tokenizer):
    path = tmp_path / "m.cllm"
    save_model(path, model, tokenizer)
    tensors = safetensors.numpy.load_file(path)
    assert set(tensors) == set(model.p)
    assert all(np.array_equal(tensors[name], model.p[name]) for name in model.p)


def test_save_model_refuses_bad_metadata_and_broken_weights(tmp_path, model, tokenizer):
    path = tmp_path / "m.cllm"
    save_model(path, model, tokenizer)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="reserved"):
        save_model(path, model, tokenizer, metadata={"config": "{}"})
    with pytest.raises(ValueError, match="strings to strings"):
        save_model(path, model, tokenizer, metadata={"step": 3})
    model.params[5] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        save_model(path, model, tokenizer)
    assert path.read_bytes() == before


def write_container(path, tensors, metadata):
    path.write_bytes(safetensors.numpy.save(tensors, metadata=metadata))


def valid_parts(model, tokenizer):
    tensors = {name: view.copy() for name, view in model.p.items()}
    metadata = {"format": "cllm", "format_version": "1", "config": json.dumps(model.config.to_dict()),
                "tokenizer": tokenizer.to_json()}
    return tensors, metadata


def _drop(d, key):
    del d[key]


def _config(**change):
    def apply(tensors, metadata):
        metadata["config"] = json.dumps(json.loads(metadata["config"]) | change)
    return apply


CORRUPTIONS = {
    "no format": (lambda t, m: _drop(m, "format"), "not a cllm model file (it has no format field"),
    "other format": (lambda t, m: m.update(format="gguf"), "its format is 'gguf'"),
    "future version": (lambda t, m: m.update(format_version="2"), "unsupported model format_version '2'"),
    "config not JSON": (lambda t, m: m.update(config="{vocab"), "bad model config"),
    "config not an object": (lambda t, m: m.update(config="[1, 2]"), "bad model config: not a JSON object"),
    "config missing a field": (lambda t, m: m.update(config=json.dumps({"vocab_size": 3})), "bad model config"),
    "config unknown field": (_config(dropout=0.1), "unknown ModelConfig fields"),
    "config invalid value": (_config(n_heads=3), "must be divisible"),
    "config disagrees with weights": (_config(dim=16), "has shape"),
    "no tokenizer": (lambda t, m: _drop(m, "tokenizer"), "bad tokenizer"),
    "tokenizer garbage": (lambda t, m: m.update(tokenizer='{"format": 1}'), "bad tokenizer"),
    "tokenizer too big": (_config(vocab_size=3), "the tokenizer has"),
    "missing tensor": (lambda t, m: _drop(t, "h.1.mlp.c_fc.bias"), "missing tensors h.1.mlp.c_fc.bias"),
    "extra tensor": (lambda t, m: t.update(secret=np.zeros(2, np.float32)), "unexpected tensors secret"),
    "wrong shape": (lambda t, m: t.update(wpe=np.zeros((4, 8), np.float32)), "'wpe' has shape (4, 8)"),
    "wrong dtype": (lambda t, m: t.update(wpe=t["wpe"].astype(np.float64)), "'wpe' is F64"),
    "half precision": (lambda t, m: t.update(wpe=t["wpe"].astype(np.float16)), "'wpe' is F16"),
    "NaN weight": (lambda t, m: t["ln_f.bias"].__setitem__(3, np.nan), "'ln_f.bias' holds non-finite"),
    "inf weight": (lambda t, m: t["wte"].__setitem__((0, 0), np.inf), "'wte' holds non-finite"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_load_model_rejects_bad_contents(tmp_path, model, tokenizer, corruption):
    corrupt, fragment = CORRUPTIONS[corruption]
    tensors, metadata = valid_parts(model, tokenizer)
    corrupt(tensors, metadata)
    path = tmp_path / "bad.cllm"
    write_container(path, tensors, metadata)
    with pytest.raises(ModelFileError) as excinfo:
        load_model(path)
    assert_one_line_error(excinfo, path, fragment)


def test_valid_parts_load(tmp_path, model, tokenizer):
    """The corruption cases above start from a file that loads."""
    path = tmp_path / "ok.cllm"
    write_container(path, *valid_parts(model, tokenizer))
    loaded, _ = load_model(path)
    assert np.array_equal(loaded.params, model.params)


@pytest.mark.parametrize("damage, fragment", [
    (lambda good: good[:-7], "not a readable safetensors file"),  # truncated
    (lambda good: good[:5], "not a readable safetensors file"),  # truncated inside the header length
    (lambda good: b"", "not a readable safetensors file"),
    (lambda good: np.random.default_rng(0).bytes(4096), "not a readable safetensors file"),
    (lambda good: b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"{not json}......" + good[24:], "not a readable"),
])
def test_load_model_rejects_damaged_bytes(tmp_path, model, tokenizer, damage, fragment):
    path = tmp_path / "m.cllm"
    save_model(path, model, tokenizer)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ModelFileError) as excinfo:
        load_model(path)
    assert_one_line_error(excinfo, path, fragment)


def test_load_model_rejects_missing_paths_and_folders_that_hold_no_model(tmp_path):
    with pytest.raises(ModelFileError) as excinfo:
        load_model(tmp_path / "nope.cllm")
    assert_one_line_error(excinfo, tmp_path / "nope.cllm", "no such model file")
    with pytest.raises(ModelFileError) as excinfo:  # a folder is read as a Hugging Face model folder
        load_model(tmp_path)
    assert_one_line_error(excinfo, tmp_path, "not a model folder (no config.json)")
    assert issubclass(ModelFileError, ValueError)  # the CLIs turn ValueError into one line and exit status 2


# ---------------------------------------------------------------------------------------------------------------
# atomic writes


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, failing, error):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old content")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(atomic.os, failing, fail)
    with pytest.raises(type(error)):
        atomic_write_bytes(path, b"new content")
    monkeypatch.undo()
    assert path.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_streamed_files_get_ordinary_permissions_and_vanish_on_failure(tmp_path, model, tokenizer):
    # safetensors' writer makes its files private; a model file written through atomic_write_file must be
    # readable as any other file this process writes (the server may run as another user).
    save_model(tmp_path / "m.cllm", model, tokenizer)
    atomic_write_bytes(tmp_path / "plain.bin", b"x")
    assert (tmp_path / "m.cllm").stat().st_mode & 0o777 == (tmp_path / "plain.bin").stat().st_mode & 0o777

    def half_written(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_write_file(tmp_path / "m.cllm", half_written)
    assert sorted(os.listdir(tmp_path)) == ["m.cllm", "plain.bin"]
    load_model(tmp_path / "m.cllm")


def test_temporary_names_differ_even_within_one_process(tmp_path):
    # Processes on two machines sharing a folder can have the same pid: the pid alone would collide.
    first, second = atomic.temporary_path(tmp_path / "f.bin"), atomic.temporary_path(tmp_path / "f.bin")
    assert first != second
    assert first.parent == tmp_path and first.name.startswith(f"f.bin.tmp-{os.getpid()}-")


def test_sweep_removes_only_temporaries_older_than_the_cutoff(tmp_path):
    names = ["model.cllm.tmp-123-0badf00d", "metrics.jsonl.tmp-77", "fresh.tmp-5-abcd1234", "notes.tmp",
             "model.cllm", "draft.tmp-notes"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    cutoff = (tmp_path / "model.cllm").stat().st_mtime
    for name in names:
        if name != "fresh.tmp-5-abcd1234":
            os.utime(tmp_path / name, (cutoff - 60, cutoff - 60))
    os.utime(tmp_path / "fresh.tmp-5-abcd1234", (cutoff + 60, cutoff + 60))  # written after the cutoff: kept
    swept = atomic.sweep_temporaries(tmp_path, older_than=cutoff)
    assert sorted(p.name for p in swept) == ["metrics.jsonl.tmp-77", "model.cllm.tmp-123-0badf00d"]
    assert sorted(os.listdir(tmp_path)) == ["draft.tmp-notes", "fresh.tmp-5-abcd1234", "model.cllm", "notes.tmp"]
    assert atomic.sweep_temporaries(tmp_path / "missing", older_than=cutoff) == []


def test_save_model_goes_through_the_atomic_write(tmp_path, monkeypatch, model, tokenizer):
    path = tmp_path / "m.cllm"
    save_model(path, model, tokenizer)
    before = path.read_bytes()
    monkeypatch.setattr(atomic.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("crash")))
    model.params[:] = 0.5
    with pytest.raises(OSError):
        save_model(path, model, tokenizer)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.cllm"]


# ---------------------------------------------------------------------------------------------------------------
# training state


def train_steps(model, optimizer, steps, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        ids = rng.integers(0, model.config.vocab_size, (2, model.config.context_length + 1), dtype=np.int32)
        model.zero_grad()
        model.forward(ids[:, :-1], ids[:, 1:])
        model.backward()
        optimizer.step(max_grad_norm=1.0)


def test_state_round_trip_resumes_bit_exactly(tmp_path, model, tokenizer):
    optimizer = AdamW(model, lr=3e-3, betas=(0.8, 0.9), weight_decay=0.05)
    train_steps(model, optimizer, 2)
    path = tmp_path / "state.safetensors"
    extra = {"rng": np.random.default_rng(3).bit_generator.state, "cursor": 17}
    save_state(path, optimizer=optimizer, step=2, extra=extra, params=model.params)
    save_model(tmp_path / "m.cllm", model, tokenizer)

    resumed_model, _ = load_model(tmp_path / "m.cllm")
    resumed_optimizer = AdamW(resumed_model, lr=3e-3, betas=(0.8, 0.9), weight_decay=0.05)
    state = load_state(path, optimizer=resumed_optimizer)
    assert state["step"] == 2 and state["extra"] == json.loads(json.dumps(extra))
    assert state["optimizer"] == {"step_count": 2, "lr": 3e-3, "betas": [0.8, 0.9], "eps": 1e-8,
                                  "weight_decay": 0.05}
    assert np.array_equal(state["params"], model.params)
    assert resumed_optimizer.step_count == 2
    assert np.array_equal(resumed_optimizer.m, optimizer.m) and np.array_equal(resumed_optimizer.v, optimizer.v)

    train_steps(model, optimizer, 2, seed=1)
    train_steps(resumed_model, resumed_optimizer, 2, seed=1)
    assert np.array_equal(resumed_model.params, model.params)


def test_state_without_params(tmp_path, model):
    optimizer = AdamW(model)
    path = tmp_path / "state.safetensors"
    save_state(path, optimizer=optimizer, step=0, extra={})
    state = load_state(path)
    assert state["params"] is None and state["step"] == 0 and state["m"].shape == (model.num_params,)


def test_state_must_match_the_model(tmp_path, model):
    path = tmp_path / "state.safetensors"
    save_state(path, optimizer=AdamW(model), step=1, extra={})
    other = GPT(ModelConfig(vocab_size=5, context_length=4, dim=4, n_layers=1, n_heads=1))
    optimizer = AdamW(other)
    with pytest.raises(ModelFileError) as excinfo:
        load_state(path, optimizer=optimizer)
    assert_one_line_error(excinfo, path, f"is for {model.num_params} parameters but the model has {other.num_params}")
    assert optimizer.step_count == 0 and not optimizer.m.any()


def test_save_state_rejects_unserialisable_extra(tmp_path, model):
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_state(tmp_path / "s", optimizer=AdamW(model), step=1, extra={"f": object()})
    with pytest.raises(ValueError, match="must be a dict"):
        save_state(tmp_path / "s", optimizer=AdamW(model), step=1, extra=[1])
    assert not (tmp_path / "s").exists()


def valid_state_parts(n=6):
    tensors = {"adamw.m": np.zeros(n, np.float32), "adamw.v": np.zeros(n, np.float32)}
    metadata = {"format": "cllm-state", "format_version": "1", "step": "3",
                "optimizer": json.dumps({"step_count": 3, "lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                         "weight_decay": 0.1}),
                "extra": "{}"}
    return tensors, metadata


STATE_CORRUPTIONS = {
    "model file format": (lambda t, m: m.update(format="cllm"), "not a cllm training state file"),
    "missing moment": (lambda t, m: _drop(t, "adamw.v"), "a training state holds"),
    "extra tensor": (lambda t, m: t.update(other=np.zeros(6, np.float32)), "a training state holds"),
    "moment sizes differ": (lambda t, m: t.update({"adamw.v": np.zeros(5, np.float32)}), "'adamw.v' has shape"),
    "params size differs": (lambda t, m: t.update(params=np.zeros(7, np.float32)), "'params' has shape"),
    "NaN moment": (lambda t, m: t["adamw.m"].__setitem__(0, np.nan), "'adamw.m' holds non-finite"),
    "step not a number": (lambda t, m: m.update(step="three"), "'step' is missing or not valid JSON"),
    "negative step": (lambda t, m: m.update(step="-1"), "non-negative integers"),
    "extra not an object": (lambda t, m: m.update(extra="[1]"), "'extra' must be a JSON dict"),
    "no optimizer": (lambda t, m: _drop(m, "optimizer"), "'optimizer' is missing"),
}


@pytest.mark.parametrize("corruption", STATE_CORRUPTIONS)
def test_load_state_rejects_bad_contents(tmp_path, corruption):
    corrupt, fragment = STATE_CORRUPTIONS[corruption]
    tensors, metadata = valid_state_parts()
    corrupt(tensors, metadata)
    path = tmp_path / "state.safetensors"
    write_container(path, tensors, metadata)
    with pytest.raises(ModelFileError) as excinfo:
        load_state(path)
    assert_one_line_error(excinfo, path, fragment)


def test_load_state_rejects_missing_and_damaged_files(tmp_path):
    path = tmp_path / "state.safetensors"
    with pytest.raises(ModelFileError, match="no such training state file"):
        load_state(path)
    write_container(path, *valid_state_parts())
    assert load_state(path)["step"] == 3
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        load_state(path)
