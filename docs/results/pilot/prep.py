# The gate-scale pilot's data (docs/results/pilot/README.md): per source, a fixed held-out 3% of whole documents,
# written as EOS-joined .txt files under data/train and data/val. Run with PYTHONHASHSEED=0 (the per-source seed
# hashes the source's name) from a directory beside the project, with the shared corpora at /work/shared/corpora.
import numpy as np, sys
from pathlib import Path
from smoe.train.data.spec import Source
from smoe.train.data.sources import iter_documents
from smoe.io.tokenizer import EOS
C = Path("/work/shared/corpora")
srcs = {"stdlib": "stdlib", "tinystories": C/"tinystories/train-2MiB.txt", "wikitext": None,
        "shakespeare": C/"tinyshakespeare/input.txt", "bible": C/"web-bible/web.txt"}
import shutil
wiki = Path("/work/scratch/wiki.txt"); shutil.copy(C/"wikitext-2/wiki.valid.tokens", wiki); srcs["wikitext"] = wiki
out = Path("data"); (out/"train").mkdir(parents=True, exist_ok=True); (out/"val").mkdir(exist_ok=True)
for name, path in srcs.items():
    docs = list(iter_documents(Source(str(path))))
    sizes = np.array([len(d.encode()) for d in docs]); total = sizes.sum()
    rng = np.random.default_rng([0, abs(hash(name)) % 2**31])
    order = rng.permutation(len(docs)); target = 0.03 * total; got = 0; held = []
    for i in order:
        if got >= target: break
        if got + sizes[i] <= 2 * target: held.append(i); got += sizes[i]
    held = set(held)
    (out/"train"/f"{name}.txt").write_text(EOS.join(d for i, d in enumerate(docs) if i not in held))
    (out/"val"/f"{name}.txt").write_text(EOS.join(d for i, d in enumerate(docs) if i in held))
    print(name, len(docs), total, got)
