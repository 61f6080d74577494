"""The gate-scale pilot's data (docs/results/pilot/README.md): per source, a fixed held-out 3% of whole documents,
written as EOS-joined .txt files under data/train and data/val. Run with PYTHONHASHSEED=0 (the per-source seed
hashes the source's name) from a directory beside the project, with the shared corpora at /work/shared/corpora."""

import shutil
from pathlib import Path

import numpy as np

from smoe.io.tokenizer import EOS
from smoe.train.data.sources import iter_documents
from smoe.train.data.spec import Source

CORPORA = Path("/work/shared/corpora")
WIKI = Path("/work/scratch/wiki.txt")


def held_out(sizes: np.ndarray, rng: np.random.Generator, share: float = 0.03) -> set[int]:
    """Whole documents in a random order until ``share`` of the bytes, skipping any that would pass twice it."""
    target, got, held = share * sizes.sum(), 0, []
    for i in rng.permutation(len(sizes)):
        if got >= target:
            break
        if got + sizes[i] <= 2 * target:
            held.append(i)
            got += sizes[i]
    return set(held)


def main() -> None:
    shutil.copy(CORPORA / "wikitext-2/wiki.valid.tokens", WIKI)
    sources = {"stdlib": "stdlib", "tinystories": CORPORA / "tinystories/train-2MiB.txt", "wikitext": WIKI,
               "shakespeare": CORPORA / "tinyshakespeare/input.txt", "bible": CORPORA / "web-bible/web.txt"}
    out = Path("data")
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "val").mkdir(exist_ok=True)
    for name, path in sources.items():
        docs = list(iter_documents(Source(str(path))))
        sizes = np.array([len(d.encode()) for d in docs])
        held = held_out(sizes, np.random.default_rng([0, abs(hash(name)) % 2**31]))
        (out / "train" / f"{name}.txt").write_text(EOS.join(d for i, d in enumerate(docs) if i not in held))
        (out / "val" / f"{name}.txt").write_text(EOS.join(d for i, d in enumerate(docs) if i in held))
        print(name, len(docs), sizes.sum(), sum(sizes[i] for i in held))


if __name__ == "__main__":
    main()
