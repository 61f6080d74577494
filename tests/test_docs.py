"""The commands README.md and docs/ show, run as written (or on tiny stand-ins), so that an example cannot rot.

Every ``smoe`` command line in a code block must parse with the command line's own parser (fast). The ones that can
run on this machine without a server, a GPU, torchrun or a Hugging Face download run in a slow scenario on tiny
models and data, each taken from the docs by its exact text, so editing a command in the docs without keeping it
working fails here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from smoe.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\s*$")


def _code_lines(path: Path) -> list[str]:
    """The lines of a file's shell code blocks (```bash, ```sh), continuation lines joined."""
    lines, block, joined = [], None, ""
    for line in path.read_text().splitlines():
        fence = _FENCE.match(line.strip())
        if fence:
            block = None if block is not None else fence.group(1)
            continue
        if block not in ("bash", "sh", "shell", "console"):  # a bare block holds output or prose
            continue
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        lines.append(joined + line)
        joined = ""
    return lines


def _variables(lines: list[str]) -> dict[str, str]:
    """Shell variables a block sets (``S="--hardware ..."``), to expand in the commands after them."""
    found = {}
    for line in lines:
        match = re.fullmatch(r'\s*([A-Z_]+)="([^"]*)"\s*', line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def documented_commands() -> list[tuple[str, str]]:
    """(file, command) for every ``smoe ...`` command in the docs' code blocks, comments dropped, one per command of
    a line joined by ``;`` or ``&&``, shell variables expanded."""
    found = []
    for path in DOCS:
        lines = _code_lines(path)
        variables = _variables(lines)
        for line in lines:
            line = re.sub(r"\s+#.*$", "", line)
            for variable, value in variables.items():
                line = line.replace(f"${variable}", value)
            for part in re.split(r";|&&", line):
                part = part.strip().removesuffix("&").strip()
                if part.startswith("smoe "):
                    found.append((path.relative_to(ROOT).as_posix(), part))
    return found


def _as_argv(command: str) -> list[str]:
    """The arguments of a documented command line, its notation resolved: ``[--opt X]`` is given, the first of
    ``a|b|c`` is chosen, ``...`` (flags elided) is dropped, a count ``N`` is 2."""
    text = command.replace("[", " ").replace("]", " ")
    argv = [a for a in shlex.split(text)[1:] if a != "..."]
    return ["2" if a == "N" else a.split("|")[0] if "|" in a and not a.startswith("-") else a for a in argv]


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) > 50 and {c.split()[1] for _, c in COMMANDS} >= {
        "presets", "inspect", "cost", "smoke", "train", "eval", "compare", "upcycle", "bench", "analyze",
        "generate", "serve", "convert"}


@pytest.mark.parametrize(("file", "command"), COMMANDS, ids=[f"{f}:{c[:60]}" for f, c in COMMANDS])
def test_every_documented_command_parses(file, command):
    parser = build_parser()
    try:
        args = parser.parse_args(_as_argv(command))
    except SystemExit as exit_:
        pytest.fail(f"{file}: `{command}` does not parse (exit {exit_.code})")
    assert callable(args.func)


# --- the commands that run here, on tiny stand-ins --------------------------------------------------------------------

# In the order they run: each documented command (its exact text in the file), and what makes it tiny. Steps and
# batches shrink, data files of the documented names hold a small generated corpus, the stdlib corpus (tens of
# seconds to tokenize) becomes one of them, and prompts get few new tokens.
TRAIN_TINY = ["--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--eval-batches", "1", "--quiet"]
SCENARIO = [
    ("README.md", "smoe presets", []),
    ("README.md", "smoe inspect deepseek-v3 [--seq-len 4096] [--json]", []),
    ("README.md", "smoe inspect qwen3-next-80b-a3b", []),
    ("README.md", "smoe inspect deepseek-v2-lite --max-expert-memory 4GB", []),
    ("README.md", "smoe cost deepseek-v3 --hardware h100-sxm,h200 --devices 8 --weights fp8 [--batch 1,64,256] "
                  "[--price-per-hour 2]", []),
    ("docs/cost.md", "smoe cost --config docs/cost/llama-3-70b.json --hardware h100-sxm,h200 --devices 8 --weights "
                     "fp8 --batch 1,64,256,1024 --price-per-hour 2", []),
    ("README.md", "smoe train --preset deepseek-v3-tiny --data stdlib --steps 200 --out runs/v3", TRAIN_TINY),
    ("README.md", "smoe train --preset mixtral-tiny --set moe.top_k=4 --data a.txt@2,b.jsonl --out runs/m --resume",
     ["--steps", "2", *TRAIN_TINY]),
    ("README.md", "smoe train --config runs/m/run.json --seed 1 --out runs/m-seed1", ["--steps", "2", *TRAIN_TINY]),
    ("docs/training.md", "smoe train --config runs/m/run.json --out runs/m2 --seed 1", ["--steps", "2", *TRAIN_TINY]),
    ("README.md", "smoe eval runs/v3 --data held_out.txt", ["--max-batches", "1", "--seq-len", "32"]),
    ("docs/cost.md", "smoe cost --config runs/m/run.json --hardware cpu-measured --weights fp32", []),
    ("docs/cost.md", "smoe cost mixtral-8x22b --weights int4 --json", []),
    ("README.md", "smoe convert runs/v3 --to hf --out hf/v3", []),
    ("docs/interop.md", "smoe convert runs/m --to hf --model-type qwen2_moe --dtype bf16 --out hf/m", []),
    ("README.md", "smoe convert runs/v3 --quantize int8 --out runs/v3-int8", []),
    ("docs/quantization.md", "smoe generate runs/v3-int8 --prompt \"Once upon a time\"", ["--max-new-tokens", "4"]),
    ("docs/quantization.md", "smoe eval runs/v3-int8 --data held_out.txt", ["--max-batches", "1", "--seq-len", "32"]),
    ("docs/quantization.md", "smoe generate runs/v3-int8 --max-expert-memory 2GB --prompt \"Once\"",
     ["--max-new-tokens", "4"]),
    ("README.md", "smoe generate runs/v3 --prompt \"Once upon a time\" [--max-new-tokens 64 --temperature 0.8 "
                  "--top-p 0.9 --seed 0]", ["--max-new-tokens", "4"]),
    ("docs/generation.md", "smoe generate runs/v3 --prompt-ids 1,2,3", ["--max-new-tokens", "4"]),
    ("README.md", "smoe generate runs/v3 --quantize int4 --prompt \"Once upon a time\"", ["--max-new-tokens", "4"]),
    ("README.md", "smoe analyze runs/v3 --data held_out.txt", ["--sequences", "4", "--seq-len", "32"]),
]
STAND_INS = {"stdlib": "a.txt"}  # data the scenario swaps for a tiny file, and why: see SCENARIO's comment


def test_the_scenario_takes_its_commands_from_the_docs():
    for file, command, _ in SCENARIO:
        assert (file, command) in COMMANDS, f"{file} no longer shows `{command}`: update tests/test_docs.py"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A directory holding the docs' data files (a small corpus of documents) and the cost configs docs/cost.md
    names, as the current directory."""
    rng = np.random.default_rng(0)
    words = "once upon a time a little fox found a red ball and played with it in the sun all day".split()
    docs = [" ".join(rng.choice(words, 60)) for _ in range(24)]
    for name in ("a.txt", "held_out.txt"):
        (tmp_path / name).write_text("<|endoftext|>".join(docs))
    (tmp_path / "b.jsonl").write_text("".join(f'{{"text": "{d}"}}\n' for d in docs))
    (tmp_path / "docs" / "cost").mkdir(parents=True)
    for config in (ROOT / "docs" / "cost").glob("*.json"):
        (tmp_path / "docs" / "cost" / config.name).write_text(config.read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.mark.slow
def test_the_documented_commands_run(workdir, capsys):
    for _, command, extra in SCENARIO:
        argv = [STAND_INS.get(a, a) for a in _as_argv(command)] + extra
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 0, f"`{command}` (run as `smoe {shlex.join(argv)}`) exited {code}: {err}"
    assert (workdir / "hf" / "m" / "config.json").is_file() and (workdir / "runs" / "v3-int8").is_dir()


# --- the Makefile ----------------------------------------------------------------------------------------------------


def _make_dry_run(*variables: str) -> str:
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # -B: print the install recipe even where .venv is already set up
    return subprocess.run(["make", "-n", "-B", "-C", str(ROOT), "install", *variables], capture_output=True,
                          text=True, check=True).stdout


def test_make_asks_for_the_cpu_build_of_torch_by_name():
    recipe = _make_dry_run()
    assert '"torch==2.13.0+cpu"' in recipe and "--extra-index-url" not in recipe  # CI depends on no remote index
    with_index = _make_dry_run("TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    assert '--extra-index-url "https://download.pytorch.org/whl/cpu"' in with_index
    assert '"torch==2.13.0"' in _make_dry_run("TORCH_SPEC=torch==2.13.0")
