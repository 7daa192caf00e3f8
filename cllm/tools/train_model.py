"""Train a model on a text file or a folder of text files.

    python -m cllm.tools.train_model DATA --out runs/mine
    python -m cllm.tools.train_model                         # a short demo on Python's own standard library

The run folder gets the tokenizer and token files (data/), model.cllm, train_state.safetensors (for --resume),
metrics.jsonl and loss.png.
"""
from __future__ import annotations

import sys
import sysconfig
import time
from functools import partial
from pathlib import Path

import anyio

from ..checkpoint import load_model
from ..data import prepare
from ..distributed import CollectiveTimeout, MPIGroup
from ..generate import complete
from ..model import GPT, ModelConfig
from ..plot import write_loss_plot
from ..spheres import SphereFailedError, SphereStalledError
from ..trainer import MODEL_FILE, Trainer, TrainingInterrupted, TrainSettings
from ._cli import Parser, non_negative_float, positive_float, positive_int, run

# With no DATA: the standard library's top-level modules (about 5 MB of Python on any machine) and a
# schedule that takes about two minutes on two cores.
DEMO_STEPS = 400


def demo_corpus() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def build_parser() -> Parser:
    d = TrainSettings()
    p = Parser(prog="train_model", description="Train a GPT-style model on text, on the CPU.")
    p.add_argument("data", nargs="?", help="a text file or a folder of them (default: a demo corpus, Python's "
                                           "standard library)")
    p.add_argument("--out", default="runs/default", help="run folder")
    p.add_argument("--val-data", help="validation text (default: the last 10%% of DATA)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", choices=["bpe", "char", "word"], default="bpe",
                   help="byte-level BPE, characters, or lower-cased words")
    g.add_argument("--vocab-size", type=positive_int, default=4096, help="for bpe and word")
    g = p.add_argument_group("model")
    g.add_argument("--dim", type=positive_int, default=128, help="model width")
    g.add_argument("--layers", type=positive_int, default=4, help="transformer blocks")
    g.add_argument("--heads", type=positive_int, default=4, help="attention heads")
    g.add_argument("--context", type=positive_int, default=128, help="context length in tokens")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="sequences per step")
    g.add_argument("--steps", type=positive_int, help=f"optimizer steps (default: {d.steps}, demo: {DEMO_STEPS})")
    g.add_argument("--lr", type=non_negative_float, default=d.lr, help="peak learning rate")
    g.add_argument("--min-lr", type=non_negative_float, default=d.min_lr, help="final learning rate (cosine decay)")
    g.add_argument("--beta2", type=non_negative_float, default=d.beta2, help="AdamW's second-moment decay")
    g.add_argument("--warmup", type=int, default=d.warmup, help="linear warmup steps")
    g.add_argument("--weight-decay", type=non_negative_float, default=d.weight_decay,
                   help="AdamW decay, on matrices only")
    g.add_argument("--grad-clip", type=non_negative_float, default=d.grad_clip, help="0 disables clipping")
    g.add_argument("--grad-accum", type=positive_int, default=d.grad_accum, help="micro-batches per step")
    g.add_argument("--eval-every", type=positive_int, default=d.eval_every, help="steps between validation runs")
    g.add_argument("--eval-batches", type=positive_int, default=d.eval_batches, help="validation batches per run")
    g.add_argument("--checkpoint-every", type=positive_int, default=d.checkpoint_every,
                   help="steps between checkpoints")
    g.add_argument("--seed", type=int, default=d.seed, help="initialisation and batch order")
    g.add_argument("--threads", type=positive_int, default=d.threads, help="worker threads (default: all cores)")
    g.add_argument("--spheres", type=positive_int, default=d.spheres,
                   help="shards per batch; fixes the result, whatever --threads is")
    g.add_argument("--step-timeout", type=positive_float,
                   help="seconds a step may take before it counts as stalled (default: 300 s for the first steps, "
                        "then 25x the median step, at least 30 s)")
    g.add_argument("--stats", action="store_true", help="per-sphere shards, busy time and tokens/s")
    g.add_argument("--distributed", choices=["mpi"],
                   help="data-parallel over MPI ranks: run under mpiexec -n R python -m mpi4py -m ...")
    g.add_argument("--stop-after", type=positive_int,
                   help="stop after this step with a checkpoint, keeping the --steps schedule (resume later)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    demo = args.data is None
    data = demo_corpus() if demo else Path(args.data)
    out = Path(args.out)
    settings = TrainSettings(
        steps=args.steps or (DEMO_STEPS if demo else TrainSettings.steps), batch_size=args.batch_size,
        lr=args.lr, min_lr=args.min_lr, beta2=args.beta2, warmup=args.warmup, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, grad_accum=args.grad_accum, eval_every=args.eval_every,
        eval_batches=args.eval_batches, checkpoint_every=args.checkpoint_every, seed=args.seed,
        threads=args.threads, spheres=args.spheres, step_timeout=args.step_timeout, stats=args.stats)
    settings.validate()
    group = MPIGroup() if args.distributed == "mpi" else None
    if group:
        group.owned_spheres(settings.spheres)  # a rank count that cannot work fails here, on every rank
    root = group is None or group.is_root
    say = print if root else (lambda *a, **k: None)  # rank 0 speaks for the job
    if demo:
        say(f"no DATA given: training a demo model on Python's standard library "
            f"({sysconfig.get_paths()['stdlib']}/*.py)", flush=True)
    if group:
        say(f"distributed: {group.size} ranks x {settings.spheres // group.size} spheres", flush=True)

    # Rank 0 prepares first; the others then reuse its files (a shared folder) or build identical ones.
    if group and not root:
        group.barrier()
    prepared = prepare(data, out / "data", tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                       val_data=args.val_data, log=say)
    if group and root:
        group.barrier()
    if args.resume:
        model, tokenizer = load_model(out / MODEL_FILE, threads=settings.threads)
        say(f"resuming {out / MODEL_FILE}: the model's own config is used", flush=True)
    else:
        tokenizer = prepared.tokenizer
        config = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=args.context, dim=args.dim,
                             n_layers=args.layers, n_heads=args.heads)
        model = GPT(config, seed=settings.seed, threads=settings.threads)
    say(f"model: {model.num_params:,} parameters ({model.config.n_layers} layers, dim {model.config.dim}, "
        f"{model.config.n_heads} heads, context {model.config.context_length}, vocab {model.config.vocab_size})",
        flush=True)

    trainer = Trainer(model, tokenizer, prepared.train, prepared.val, settings, out,
                      progress=not args.no_progress, group=group)
    if args.resume:
        trainer.resume()
        say(f"resumed at step {trainer.step} of {settings.steps}", flush=True)
    try:
        result = anyio.run(partial(trainer.run, until=args.stop_after))
    except TrainingInterrupted as e:
        say(f"train_model: {e}", file=sys.stderr)
        return e.exit_status
    except (SphereStalledError, SphereFailedError, CollectiveTimeout) as e:
        where = f"rank {group.rank}: " if group else ""
        print(f"train_model: error: {where}{e}; the last checkpoint in {out} is intact", file=sys.stderr,
              flush=True)
        if group:
            # The other ranks would otherwise wait for this one until their own deadline. MPI_Abort tears the
            # job down at once, stdio forwarding included: give the line above a moment to reach the user.
            time.sleep(1.0)
            group.abort(1)
        return 1
    if not root:
        return 0
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"done: {result.steps} steps in {result.seconds:.0f} s, loss {result.final_loss:.4f}{val}", flush=True)
    plot = write_loss_plot(out)
    if plot:
        print(f"loss curve: {plot}")
    prompt = "def " if demo else ""
    text, _ = complete(model, tokenizer, prompt, max_new_tokens=120, temperature=0.8, top_k=40, seed=settings.seed)
    print(f"sample:\n{prompt}{text}\n")
    print(f"model: {result.model_path}")
    print(f"generate more: python -m cllm.tools.inference {result.model_path} -p \"...\"")
    return 0


if __name__ == "__main__":
    run("train_model", lambda: main(sys.argv[1:]))
