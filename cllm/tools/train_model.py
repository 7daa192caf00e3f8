"""Train a model on a text file or a folder of text files.

    python -m cllm.tools.train_model DATA --out runs/mine
    python -m cllm.tools.train_model DATA --init-from gpt2/     # fine-tune a model (.cllm, GGUF, a Hugging Face folder)
    python -m cllm.tools.train_model --out runs/mine --resume   # continue that run, as its run.json records it
    python -m cllm.tools.train_model                            # a short demo on Python's own standard library

The run folder gets run.json (what the run was started with), the tokenizer and token files (data/), model.cllm,
train_state.safetensors (for --resume), metrics.jsonl and loss.png, and a lock file that keeps out a second run
while this one holds the folder. With --tensorboard, also TensorBoard's event files, in tensorboard/.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import shutil
import sys
import sysconfig
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import anyio

from ..checkpoint import load_model
from ..data import Prepared, TokenizerSettings, prepare, reopen
from ..distributed import CollectiveTimeout, MPIGroup
from ..errors import UsageError
from ..formats.gguf_in import is_gguf, quantized_types
from ..generate import complete
from ..model import ARCHITECTURES, GPT, ModelConfig
from ..plot import write_loss_plot
from ..run_folder import DATA_DIR, CorpusRecord, RunRecord, hold, start
from ..spheres import SphereFailedError, SphereStalledError, default_spheres
from ..tensorboard import TENSORBOARD_DIR, check_dir, require
from ..tokenizer import Tokenizer
from ..trainer import STATE_FILE, Trainer, TrainingDiverged, TrainingInterrupted, TrainSettings, flag
from ._cli import MODEL_HELP, Parser, add_flags, flag_of, given_settings, positive_int, run

# With no DATA: the standard library's top-level modules (about 5 MB of Python on any machine) and a
# schedule that takes about two minutes on two cores.
DEMO_STEPS = 400
DEFAULT_OUT = "runs/default"
SERVE_ADDRESS = "http://127.0.0.1:8000/"  # where cllm-serve listens by default (not imported: it needs the serve extra)


def demo_corpus() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


@dataclass(frozen=True)
class ModelShape:
    """The model flags. The fields are ModelConfig's; the vocabulary's size comes from the tokenizer."""
    dim: int = field(default=128, metadata={"help": "model width"})
    n_layers: int = field(default=4, metadata={"flag": "--layers", "help": "transformer blocks"})
    n_heads: int = field(default=4, metadata={"flag": "--heads", "help": "attention heads"})
    context_length: int = field(default=128, metadata={"flag": "--context", "help": "context length in tokens"})
    arch: str = field(default="gpt2", metadata={
        "choices": ARCHITECTURES, "help": "the block: gpt2 (learned positions, LayerNorm, GELU, biases), llama "
                                          "(RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases), qwen2 "
                                          "(llama with biases on q, k and v) or qwen3 (llama with an RMSNorm of "
                                          "each q and k head)"})
    # the llama family's own settings; ModelConfig fills what is not given
    n_kv_heads: int | None = field(default=None, metadata={
        "flag": "--kv-heads", "default_help": "--heads", "help": "llama family: key/value heads, a divisor of --heads"})
    head_dim: int | None = field(default=None, metadata={
        "default_help": "--dim / --heads", "help": "llama family: channels of one attention head"})
    intermediate_size: int | None = field(default=None, metadata={
        "default_help": "8/3 of --dim, rounded up to a multiple of 32",
        "help": "llama family: the SwiGLU MLP's width"})
    rope_theta: float | None = field(default=None, metadata={
        "default_help": 10000.0, "help": "llama family: the base of the rotary position embedding's frequencies"})

    LLAMA_ONLY = ("n_kv_heads", "head_dim", "intermediate_size", "rope_theta")

    def config(self, vocab_size: int) -> ModelConfig:
        """The model these flags describe. The llama family's settings, given with --arch gpt2, are refused by
        flag."""
        given = {name: value for name, value in dataclasses.asdict(self).items() if value is not None}
        if self.arch == "gpt2":
            for setting in dataclasses.fields(self):
                if setting.name in self.LLAMA_ONLY and setting.name in given:
                    raise UsageError(f"{flag_of(setting)} is a setting of the llama family (--arch llama, qwen2, "
                                     f"qwen3)")
        return ModelConfig(vocab_size=vocab_size, **given)


# What a run is made of, group by group (RunRecord has the same three). Each dataclass is the one place where its
# flags' defaults and help are written.
SETTINGS = {"tokenizer": TokenizerSettings, "model": ModelShape, "training": TrainSettings}
MAY_CHANGE_ON_RESUME = ", ".join(map(flag, TrainSettings.RESUME_OVERRIDES)) + \
    ", --stop-after, --no-progress and --tensorboard"


def build_parser() -> Parser:
    p = Parser(prog="train_model", description="Train a GPT-style model on text, on the CPU.",
               argument_default=argparse.SUPPRESS)
    p.add_argument("data", nargs="?", help="a text file or a folder of them (default: a demo corpus, Python's "
                                           "standard library; with --resume, the run's own)")
    p.add_argument("--out", help=f"run folder (default: {DEFAULT_OUT})")
    p.add_argument("--val-data", help="validation text (default: the last 10%% of DATA)")
    p.add_argument("--init-from", metavar="MODEL",
                   help=f"fine-tune this model ({MODEL_HELP}; a quantized GGUF's weights are dequantized, and "
                        f"training is in float32): its weights, shape and tokenizer, which tokenizes DATA; the model "
                        f"and tokenizer flags are then refused")
    add_flags(p.add_argument_group("tokenizer"), TokenizerSettings)
    add_flags(p.add_argument_group("model"), ModelShape)
    add_flags(p.add_argument_group("training"), TrainSettings,
              {"steps": f"{TrainSettings().steps}, demo: {DEMO_STEPS}"})
    g = p.add_argument_group("running")
    g.add_argument("--distributed", choices=["mpi"],
                   help="data-parallel over MPI ranks: run under mpiexec -n R python -m mpi4py -m ...")
    g.add_argument("--stop-after", type=positive_int,
                   help="stop after this step with a checkpoint, keeping the --steps schedule (resume later)")
    g.add_argument("--resume", action="store_true",
                   help=f"continue the run in --out from its last checkpoint, as its run.json records it; flags "
                        f"that would change the run are refused, except {MAY_CHANGE_ON_RESUME}")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--tensorboard", nargs="?", const="", metavar="DIR",
                   help=f"log the metrics as TensorBoard scalars too, in DIR (default: the run folder's "
                        f"{TENSORBOARD_DIR}/; give DIR as --tensorboard=DIR or after DATA); needs pip install "
                        f"\"cllm[tensorboard]\". Not recorded in run.json: pass it again with --resume, and the log "
                        f"goes on in the same DIR, where TensorBoard shows a step trained again with its later values")
    return p


def refuse_changes(record: RunRecord, given: dict, out: Path) -> None:
    """--resume continues the run that run.json records: a flag or DATA that would change it is refused, naming it.
    One given with the run's own value changes nothing and is accepted."""
    for group, settings in SETTINGS.items():
        recorded = getattr(record, group)
        for setting in dataclasses.fields(settings):
            name = setting.name
            if name in given and name not in TrainSettings.RESUME_OVERRIDES and given[name] != getattr(recorded, name):
                raise UsageError(f"{flag_of(setting)} {given[name]} would change the run in {out}, which was started "
                                 f"with {getattr(recorded, name)}: --resume continues a run as it was started "
                                 f"(only {MAY_CHANGE_ON_RESUME} may differ)")
    if "data" in given:
        record.data.require(given["data"], "DATA", out)
    if "val_data" in given:
        if record.val_data is None:
            raise UsageError(f"--val-data would change the run in {out}, which was started without it")
        record.val_data.require(given["val_data"], "--val-data", out)


def refuse_shape_flags(given: dict) -> None:
    """A fine-tuned model keeps its shape and its tokenizer: their flags would contradict it."""
    for settings in (TokenizerSettings, ModelShape):
        for setting in dataclasses.fields(settings):
            if setting.name in given:
                raise UsageError(f"{flag_of(setting)} would change the model given by --init-from, whose shape "
                                 f"and tokenizer a fine-tuning run keeps: leave it out")


def resumed_settings(record: RunRecord, given: dict) -> TrainSettings:
    """What the run computes comes from its record (--steps aside, if given); how this process runs it, from this
    command line, as for any run."""
    return dataclasses.replace(
        record.training, steps=given.get("steps", record.training.steps),
        **{name: given.get(name, getattr(TrainSettings(), name)) for name in TrainSettings.EXECUTION})


def start_run(out: Path, given: dict, settings: TrainSettings, base: tuple[GPT, Tokenizer] | None, *, root: bool,
              say) -> tuple[Prepared, RunRecord]:
    """A new run: the tokenizer and token files from DATA (or the demo corpus), and on rank 0 the run's record.
    base is the model to fine-tune and its tokenizer, which then tokenizes DATA."""
    data = [Path(given["data"])] if "data" in given else demo_corpus()
    val_data = given.get("val_data")
    if base:
        model, tokenizer = base
        prepared = prepare(data[0] if "data" in given else data, out / DATA_DIR, tokenizer=tokenizer,
                           val_data=val_data, exclude=out, log=say)
        tokenizer_settings, config = TokenizerSettings(tokenizer.kind, tokenizer.vocab_size), model.config
    else:
        tokenizer_settings = given_settings(TokenizerSettings, given)
        prepared = prepare(data[0] if "data" in given else data, out / DATA_DIR, tokenizer=tokenizer_settings.kind,
                           vocab_size=tokenizer_settings.vocab_size, val_data=val_data, exclude=out, log=say)
        config = given_settings(ModelShape, given).config(prepared.tokenizer.vocab_size)
    report = prepared.report
    record = RunRecord(CorpusRecord.of(data, report.fingerprint),
                       val_data and CorpusRecord.of([val_data], report.val_fingerprint), tokenizer_settings, config,
                       settings, prepared.recipe.hex(), str(Path(given["init_from"]).resolve()) if base else None)
    if root and start(out, record):
        say(f"a new run replaces the one in {out}", flush=True)
    return prepared, record


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with ExitStack() as held:  # what this process holds until it ends: the run folder's lock
        return train(vars(args), held)


def train(given: dict, held: ExitStack) -> int:
    """given: the arguments the user gave, and only those."""
    out = Path(given.get("out", DEFAULT_OUT))
    record = RunRecord.load(out) if given.get("resume") else None
    demo = record is None and "data" not in given
    if record:
        refuse_changes(record, given, out)
        if "init_from" in given and str(Path(given["init_from"]).resolve()) != record.init_from:
            raise UsageError(f"--init-from {given['init_from']} would change the run in {out}, which was started "
                             f"{f'from {record.init_from}' if record.init_from else 'from scratch'}")
        settings = resumed_settings(record, given)
    else:
        settings = given_settings(TrainSettings, given, TrainSettings(steps=DEMO_STEPS) if demo else None)
    settings.validate()
    tensorboard = tensorboard_dir(given, out)
    # The model to fine-tune; on a resume, only while the run has no checkpoint yet (which holds the weights).
    init_from = record.init_from if record else given.get("init_from")
    if init_from and not record:
        refuse_shape_flags(given)
    elif not record:  # the shape's flags are checked before the corpus is read; only its vocabulary is unknown yet
        given_settings(ModelShape, given).config(vocab_size=1)
    base = (load_model(init_from, dequantize=True) if init_from and not (record and (out / STATE_FILE).exists())
            else None)
    shape = record.model if record else base[0].config if base else given_settings(ModelShape, given)
    seq = settings.window(shape.context_length)
    if settings.spheres is None:  # the default cut, fixed here so that the run record holds it
        settings = dataclasses.replace(settings, spheres=default_spheres(settings.batch_size, seq))
    group = MPIGroup() if given.get("distributed") == "mpi" else None
    if group:
        group.owned_spheres(settings.spheres)  # a rank count that cannot work fails here, on every rank
    root = group is None or group.is_root
    say = print if root else (lambda *a, **k: None)  # rank 0 speaks for the job
    if demo:
        say(f"no DATA given: training a demo model on Python's standard library "
            f"({sysconfig.get_paths()['stdlib']}/*.py)", flush=True)
    if group:
        say(f"distributed: {group.size} ranks x {settings.spheres // group.size} spheres", flush=True)

    # Rank 0 prepares first; the others then reuse its files (a shared folder) or build identical ones. A rank
    # that fails on the way returns a non-zero status, which ends every rank (tools._cli.run): none is left at the
    # barrier.
    if group and not root:
        group.barrier()
    if root:
        held.enter_context(hold(out))  # rank 0 holds the folder for the whole job
    if record:  # the run's own tokenizer and token files, as they are: the corpus is not looked at
        prepared = reopen(out / DATA_DIR, bytes.fromhex(record.tokens))
    else:
        prepared, record = start_run(out, given, settings, base, root=root, say=say)
    if group and root:
        group.barrier()
    if base:
        model = base[0]
        model.threads = settings.threads
        say(f"fine-tuning {init_from}", flush=True)
        quantized = quantized_types(init_from) if is_gguf(init_from) else []
        if quantized:
            say(f"train_model: {init_from} holds {', '.join(quantized)} weights: training starts from them "
                f"dequantized, and trains in float32", file=sys.stderr, flush=True)
    else:
        model = GPT(record.model, seed=settings.seed, threads=settings.threads)
    cfg = model.config
    heads = f"{cfg.n_heads} heads" + (f" over {cfg.n_kv_heads} kv heads" if cfg.n_kv_heads not in (None, cfg.n_heads)
                                      else "")
    say(f"model: {model.num_params:,} parameters ({cfg.arch}, {cfg.n_layers} layers, dim {cfg.dim}, {heads}, "
        f"context {cfg.context_length}, vocab {cfg.vocab_size})", flush=True)

    trainer = Trainer(model, prepared.tokenizer, prepared.train, prepared.val, settings, out,
                      progress=not given.get("no_progress", False), group=group, tensorboard=tensorboard)
    stop_after = given.get("stop_after")
    if given.get("resume"):
        trainer.resume()
        if trainer.step >= min(settings.steps, stop_after or settings.steps):
            say(nothing_to_train(out, trainer.step, settings.steps, stop_after), flush=True)
            return 0
        if root and settings.steps != record.training.steps:  # later resumes train to the new total too
            dataclasses.replace(record, training=dataclasses.replace(record.training, steps=settings.steps)).save(out)
        say(f"resumed at step {trainer.step} of {settings.steps}", flush=True)
    try:
        result = anyio.run(partial(trainer.run, until=stop_after))
    except TrainingInterrupted as e:
        say(f"train_model: {e}", file=sys.stderr)
        return e.exit_status
    except (SphereStalledError, SphereFailedError, CollectiveTimeout, TrainingDiverged) as e:
        # Under MPI, a non-zero status ends every rank at once (tools._cli.run), so none waits for this one.
        where = f"rank {group.rank}: " if group else ""
        print(f"train_model: error: {where}{e}; the last checkpoint in {out} is intact", file=sys.stderr,
              flush=True)
        return 1
    if not root:
        return 0
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"done: {result.steps} steps in {result.seconds:.0f} s, loss {result.final_loss:.4f}{val}", flush=True)
    plot = write_loss_plot(out)
    if plot:
        print(f"loss curve: {plot}")
    if tensorboard:
        print(f"tensorboard log: {tensorboard} (view it with: tensorboard --logdir {tensorboard})")
    prompt = "def " if demo else ""
    text, _ = complete(model, prepared.tokenizer, prompt, max_new_tokens=120, temperature=0.8, top_k=40,
                       seed=settings.seed)
    print(f"sample:\n{prompt}{text}\n")
    model_path = shlex.quote(str(result.model_path))
    print(f"model: {result.model_path}")
    print(f"generate more: {command('cllm-generate', 'inference')} {model_path} -p \"...\"")
    print(f"serve it:      {command('cllm-serve', 'serve')} {model_path}, and open its playground at {SERVE_ADDRESS}")
    return 0


def command(script: str, module: str) -> str:
    """How this user runs one of cllm's tools: its command when the install put it on PATH, else `python -m`."""
    return script if shutil.which(script) else f"python -m cllm.tools.{module}"


def tensorboard_dir(given: dict, out: Path) -> Path | None:
    """Where --tensorboard logs, or None without it. Checked before the corpus is read: a missing tensorboardX
    or a DIR that is a file fails at once."""
    if "tensorboard" not in given:
        return None
    require()
    logdir = Path(given["tensorboard"]) if given["tensorboard"] else out / TENSORBOARD_DIR
    check_dir(logdir)
    return logdir


def nothing_to_train(out: Path, step: int, steps: int, stop_after: int | None) -> str:
    if step == steps:
        return f"the run in {out} finished at step {step} of {steps}; pass --steps N to train longer"
    past = f"--steps {steps}" if step > steps else f"--stop-after {stop_after}"
    return f"the run in {out} is at step {step} already, past {past}: nothing to train"


if __name__ == "__main__":
    run("train_model", lambda: main(sys.argv[1:]))
