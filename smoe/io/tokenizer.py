"""Tokenizer files: the end-of-text token smoe trains with, loading a ``tokenizer.json`` from a file, a model
directory or a checkpoint, and the chat template beside it."""

from __future__ import annotations

from pathlib import Path

from smoe.io.files import parse_json

# smoe's byte-level BPE both separates and ends documents with this special token (GPT-2's spelling).
EOS = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
# Hugging Face keeps a tokenizer's chat template in tokenizer_config.json (`chat_template`) or, since 2025, in a file
# of its own.
TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE = "tokenizer_config.json", "chat_template.jinja"


def tokenizer_from_str(text: str, where: str | Path):
    """A ``tokenizers.Tokenizer`` from the text of a tokenizer.json; one ValueError naming ``where`` if unreadable."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(text)
    except Exception as err:  # tokenizers raises a bare Exception for bad files
        raise ValueError(f"{where}: not a readable tokenizer.json ({str(err)[:200]})") from None


def load_tokenizer(path: str | Path):
    """The tokenizer of a ``tokenizer.json`` file, or of the directory (model, checkpoint) holding one. EOS is
    added as a special token when the file lacks it, so every tokenizer smoe trains with can end documents."""
    path = Path(path).expanduser()
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: unreadable ({err})") from None
    tokenizer = tokenizer_from_str(text, file)
    if tokenizer.token_to_id(EOS) is None:
        tokenizer.add_special_tokens([EOS])
    return tokenizer


def read_tokenizer_json(path: str | Path) -> str | None:
    """The text of the ``tokenizer.json`` of a model directory or checkpoint (a run directory: its latest
    checkpoint's), or None when there is none."""
    return _read_beside(path, TOKENIZER_FILE)


def read_chat_template(path: str | Path) -> tuple[str | None, dict[str, str]]:
    """The chat template (Jinja source) of a model directory or checkpoint, or None when it has none, and the
    special tokens templates refer to (``bos_token``, ``eos_token``, ... as strings) from tokenizer_config.json."""
    text = _read_beside(path, TOKENIZER_CONFIG_FILE)
    config = parse_json(text, str(Path(path) / TOKENIZER_CONFIG_FILE)) if text is not None else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{Path(path) / TOKENIZER_CONFIG_FILE}: chat_template must be a string or a list of named "
                         f"templates")
    template = template if template is not None else _read_beside(path, CHAT_TEMPLATE_FILE)
    special = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token  # older files: {"content": ...}
        if isinstance(token, str):
            special[name] = token
    return template, special


def _read_beside(path: str | Path, name: str) -> str | None:
    """The text of file ``name`` in a model directory or checkpoint (a run directory: its latest checkpoint's), or
    None when there is none."""
    from smoe.io.checkpoint import latest_checkpoint

    path = Path(path)
    latest = latest_checkpoint(path, resumable=False) if path.is_dir() else None
    for candidate in (path, *([latest.path] if latest is not None else [])):
        file = candidate / name
        if file.is_file():
            try:
                return file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise ValueError(f"{file}: unreadable ({err})") from None
    return None


def find_tokenizer(path: str | Path):
    """The tokenizer of a model directory or checkpoint (a run directory: its latest checkpoint's), or None when
    it has none (token ids still work)."""
    text = read_tokenizer_json(path)
    return None if text is None else tokenizer_from_str(text, Path(path) / TOKENIZER_FILE)
