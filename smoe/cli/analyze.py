"""``smoe analyze``: expert specialisation analyses of a checkpoint on text (smoe.eval.analysis)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="expert specialisation analyses of a checkpoint on text")
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--data", required=True, help="text to analyse (several sources give domain affinity)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--sequences", type=int, default=64, help="sequences to route")
    p.add_argument("--text-field", default="text")
    p.add_argument("--out", help="JSON output file (default: CHECKPOINT/analysis.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from smoe.eval.analysis import analyze
    from smoe.io.checkpoint import list_checkpoints, load_model
    from smoe.io.files import write_json
    from smoe.io.tokenizer import load_tokenizer
    from smoe.train.data import tokenize_documents, val_sequences

    model, path = load_model(args.checkpoint)
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"{path}: has no tokenizer.json, so text cannot be tokenized for it")
    tokenizer = load_tokenizer(path / "tokenizer.json")
    split = tokenize_documents(args.data, tokenizer, args.text_field)
    seqs, sources = val_sequences(split, args.seq_len, args.sequences)
    batches = [(t[:, :-1], t[:, 1:]) for t in seqs.split(8)]
    # earlier checkpoints of the same run, for router saturation
    earlier = [(c.step, load_model(c.path)[0]) for c in list_checkpoints(path.parent.parent, resumable=False)
               if c.path != path and c.path.name < path.name]
    result = analyze(model, batches, sources, list(split.tokens), tokenizer, earlier)
    out = Path(args.out) if args.out else path / "analysis.json"
    write_json(out, result.to_json(), indent=1)
    print(f"{path}: loss {result.loss:.4f} on {seqs.shape[0]} sequences of {args.seq_len}")
    for line in result.lines():
        print("  " + line)
    print(f"written: {out}")
