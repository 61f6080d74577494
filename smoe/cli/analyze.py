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
    write_json(out, result, indent=1)
    print(f"{path}: loss {result['loss']:.4f} on {seqs.shape[0]} sequences of {args.seq_len}")
    for layer, v in result["layers"].items():
        c = v["consecutive"]
        print(f"  layer {layer}: same first expert {c['first']:.3f} (random {c['first_uniform']:.3f}, "
              f"load-weighted {c['first_load_weighted']:.3f}), top-k overlap {c['any']:.3f} (random "
              f"{c['any_uniform']:.3f}, load-aware {c['any_load_aware']:.3f}), dead {v['dead']}")
        if "specialisation" in v:
            sp = v["specialisation"]
            print(f"    specialisation {sp['score']:.3f} (sources shuffled: {sp['shuffled_mean']:.3f} ± "
                  f"{sp['shuffled_std']:.3f})")
    for name, rise in result["knockout"].items():
        share = result["knockout_fraction"].get(name)
        print(f"  knock-out {name}: loss {rise:+.4f}" + (f" ({share:.1%} of routed experts)" if share else ""))
    red = result["redundancy"]
    if red["loss"]:
        print("  redundancy, loss when each token loses its top-scored experts: " + ", ".join(
            f"{r * 16:g}/16 ({n}) {loss - result['loss']:+.4f}"
            for r, n, loss in zip(red["ratios"], red["disabled_experts"], red["loss"], strict=True)))
    for step, value in result.get("saturation", {}).items():
        chances = [v["chance"] for v in result["saturation_by_layer"][step].values()]
        chance = sum(chances) / len(chances)
        print(f"  saturation at step {step}: {value:.3f} (chance {chance:.3f})")
    print(f"written: {out}")
