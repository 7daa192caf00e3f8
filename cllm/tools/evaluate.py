"""How well a model predicts a text: its loss, perplexity and bits per byte, with the model's own tokenizer.

    python -m cllm.tools.evaluate runs/default/model.cllm held_out.txt
    python -m cllm.tools.evaluate path/to/SmolLM2-135M texts/ --seq-len 512
    python -m cllm.tools.evaluate SmolLM2-135M-Instruct-Q4_K_M.gguf held_out.txt

DATA is read as train_model reads it (a file or a folder; the same decoding, a separator after each file) and
cut into consecutive windows of --seq-len tokens (default: the model's context), each predicting the token after
each of its positions: every token but the first is predicted once, the last window being shorter. The loss is
the mean negative log-likelihood per predicted token in nats; perplexity is exp(loss); bits per byte is the
total in bits over the text's UTF-8 bytes, a figure that does not depend on the tokenizer.
"""
from __future__ import annotations

import math
import sys

import numpy as np
from tqdm import tqdm

from .._kernels import crossentropy
from ..checkpoint import load_model
from ..data import encode_documents, scan
from ..errors import UsageError
from ..model import ForwardWorkspaces
from ..threads import available_cpus, blas_limit
from ._cli import MODEL_HELP, Parser, positive_int, run


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="evaluate", description="Report a model's loss, perplexity and bits per byte on a text.")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("data", help="a text file or a folder of them")
    p.add_argument("--seq-len", type=positive_int, help="tokens per window (default: the model's context)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass")
    p.add_argument("--threads", type=positive_int, default=available_cpus(),
                   help="threads, the whole budget (default: the CPUs this process may use)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    model, tokenizer = load_model(args.model, threads=args.threads)
    seq = args.seq_len or model.config.context_length
    if seq > model.config.context_length:
        raise UsageError(f"--seq-len {seq} is longer than the model's context ({model.config.context_length})")
    corpus = scan(args.data)
    tokens = np.concatenate(list(encode_documents(tokenizer, corpus.files)))
    n_bytes = sum(len(text.encode("utf-8")) for text in corpus.texts())
    if tokens.size < 2:
        raise UsageError(f"{args.data} holds {tokens.size} token(s): there is nothing to predict")
    with blas_limit(args.threads):
        total, predicted = negative_log_likelihood(model, tokens, seq, args.batch_size, progress=not args.no_progress)
    loss = total / predicted
    print(f"{args.model} on {args.data} ({corpus.describe()}): {predicted:,} tokens predicted, windows of {seq}")
    print(f"loss {loss:.4f} nats/token, perplexity {math.exp(loss):.3f}, "
          f"bits per byte {total / math.log(2) / n_bytes:.4f}")
    return 0


def negative_log_likelihood(model, tokens: np.ndarray, seq: int, batch_size: int, *,
                            progress: bool = False) -> tuple[float, int]:
    """(the summed negative log-likelihood in nats, the number of tokens predicted) over consecutive windows of
    seq tokens, each predicting the tokens after its positions."""
    starts = list(range(0, tokens.size - 1, seq))
    workspaces = ForwardWorkspaces(model.config)
    total, predicted = 0.0, 0
    # Full windows batch together; the shorter last one goes alone.
    full = [s for s in starts if s + seq < tokens.size]
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[s] for s in starts if s + seq >= tokens.size]
    for batch in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
        length = min(seq, tokens.size - 1 - batch[0])
        inputs = np.stack([tokens[s:s + length] for s in batch])
        targets = np.stack([tokens[s + 1:s + 1 + length] for s in batch]).reshape(-1)
        ws = workspaces.get(len(batch), length)
        model.forward_ws(ws, inputs, None)  # on the model's threads
        logits = ws.a["logits"]
        total += crossentropy.cross_entropy(logits, targets, np.empty(targets.size, np.float32), None, 0.0)
        predicted += targets.size
    return total, predicted


if __name__ == "__main__":
    run("evaluate", lambda: main(sys.argv[1:]))
