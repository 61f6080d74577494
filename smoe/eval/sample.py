"""A sample of text from a suite's best model, for the report: what its loss means in words."""

from __future__ import annotations

from pathlib import Path

from smoe.eval.settings import SPLIT_SEED, CompareSettings
from smoe.generation import generate
from smoe.io.checkpoint import load_model
from smoe.io.tokenizer import EOS, load_tokenizer
from smoe.train.data import prepare_data, val_sequences

PROMPT_TOKENS, NEW_TOKENS = 32, 96


def sample_text(run: Path, settings: CompareSettings, log=print) -> str:
    """The run's final model continuing the first PROMPT_TOKENS tokens of the suite's validation set: NEW_TOKENS
    tokens sampled at temperature 0.8 and top-p 0.95 with a fixed seed, returned as text with the prompt before a
    ``⟶`` mark."""
    model, path = load_model(run)
    tokenizer = load_tokenizer(path / "tokenizer.json")
    data = settings.run_data(None)
    prepared = prepare_data(data.data, val_spec=data.val_data, tokenizer=path / "tokenizer.json",
                            text_field=data.text_field, seed=SPLIT_SEED, val_fraction=data.val_fraction)
    length = min(PROMPT_TOKENS, model.config.max_seq_len // 4)
    seqs, _ = val_sequences(prepared.val, length, 1)
    prompt = seqs[0, :length].tolist()
    log(f"sampling from {path}")
    new = generate(model.eval(), [prompt], max_new_tokens=min(NEW_TOKENS, model.config.max_seq_len - length),
                   temperature=0.8, top_p=0.95, seed=0, stop_tokens=[tokenizer.token_to_id(EOS)])
    return tokenizer.decode(prompt) + " ⟶ " + tokenizer.decode(new[0].tolist())
