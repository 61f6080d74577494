"""The command line's flags, generated from the config dataclasses (smoe.train.config, CompareSettings, CostSettings,
ServeConfig, UpcycleSpec, OffloadConfig), and the one place a field name becomes a flag: in help texts, in the
parser, and in the library's error messages. Also the flags several commands share: the model a command names,
--quantize, --dtype."""

from __future__ import annotations

import argparse
import re
import typing
from dataclasses import fields

from smoe.config import DEFAULT_INT4_GROUP, INT4_GROUP_SIZES
from smoe.cost import CostSettings
from smoe.eval.settings import CompareSettings
from smoe.offload.budget import OffloadConfig
from smoe.serve.config import ServeConfig
from smoe.train.config import DataConfig, TrainConfig
from smoe.upcycling.spec import UpcycleSpec


def flag(name: str) -> str:
    """The one place a config field's name becomes its command-line flag."""
    return "--" + name.replace("_", "-")


_BACKTICKED = re.compile(r"`([a-z][a-z0-9_]*)`")
# Names that library errors put first and the command line spells as flags: config fields and the few
# command-line-only options the library also names.
_FLAG_NAMES = {f.name for cls in (TrainConfig, DataConfig, CompareSettings, CostSettings, ServeConfig, UpcycleSpec,
                                   OffloadConfig) for f in fields(cls)} | {
    "out", "resume", "config", "jobs", "suite", "presets", "contrasts", "reuse"}


def as_flags(text: str) -> str:
    """Field names written as `field` in help texts and messages, shown as --field."""
    return _BACKTICKED.sub(lambda m: flag(m.group(1)), text)


def user_message(err: Exception) -> str:
    """A library error for the command line: its leading field name (``seq_len 512: ...``) and backticked names
    become flags (``--seq-len 512: ...``)."""
    text = str(err)
    match = re.match(r"([a-z][a-z0-9_]*)(?=[ :])", text)
    if match and match.group(1) in _FLAG_NAMES:
        text = flag(match.group(1)) + text[match.end():]
    return as_flags(text)


def add_config_arguments(parser: argparse.ArgumentParser, cls, only: tuple[str, ...] | None = None,
                         shown_defaults: dict | None = None, required: tuple[str, ...] = ()) -> None:
    """One flag per field of the dataclass ``cls`` (or of the fields in ``only``), typed from its annotation, with
    its help text. A flag not given is None, which means "the default of the settings it fills"; where that differs
    from the field's own default, ``shown_defaults`` says so in the help. The fields in ``required`` must be
    given."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if only is not None and f.name not in only:
            continue
        kind = hints[f.name]
        text = as_flags(f.metadata["help"])
        if f.name in (shown_defaults or {}):
            text += f" (default here: {shown_defaults[f.name]})"
        options: dict = {"default": None, "help": text.replace("%", "%%"), "required": f.name in required}
        if kind is bool:
            parser.add_argument(flag(f.name), action="store_true", **options)
            continue
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) is typing.Literal:
            options["choices"] = list(typing.get_args(kind))
        elif typing.get_origin(kind) is tuple:  # tuple[float, ...]: comma-separated on the command line
            options.update(type=_numbers(args[0]), metavar="A,B,...")
            kind = None
        elif args:  # X | None
            kind = args[0]
            if typing.get_origin(kind) is typing.Literal:
                options["choices"] = list(typing.get_args(kind))
        parser.add_argument(flag(f.name), **{"type": kind if kind in (int, float) else str, **options})


def _numbers(kind):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None

    return parse


def given(args: argparse.Namespace, cls) -> dict:
    """The fields of ``cls`` given on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}


def check_quantize_flags(args: argparse.Namespace) -> None:
    """--group-size belongs to --quantize int4 only."""
    if args.group_size is not None and args.quantize != "int4":
        raise ValueError("--group-size: only with --quantize int4 (int8 has one scale per output channel)")


def add_quantize_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """--quantize and --group-size, for the commands that load a model to run it (``what`` it does with it)."""
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help=f"{what} with weight-only quantised linear layers and experts (int8: a scale per output "
                        "channel; int4: a scale and offset per group of inputs; docs/quantization.md)")
    add_group_size_argument(p)


def add_group_size_argument(p: argparse.ArgumentParser) -> None:
    """--group-size, the inputs per group of --quantize int4."""
    sizes = ", ".join(map(str, INT4_GROUP_SIZES))
    p.add_argument("--group-size", type=int, help=f"with --quantize int4: inputs per group, one of {sizes} "
                                                  f"(default {DEFAULT_INT4_GROUP})")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The three ways a command names a model config: a preset NAME, --hf-config PATH or --config FILE."""
    p.add_argument("name", nargs="?", help="preset name (see `smoe presets`)")
    p.add_argument("--hf-config", metavar="PATH", help="a Hugging Face config.json, or a directory holding one")
    p.add_argument("--config", metavar="FILE", help="a run config (JSON with model_config; a run's run.json is one)")


def model_config(args: argparse.Namespace):
    """The model a command names: a preset NAME, --hf-config PATH or --config FILE (exactly one)."""
    from smoe import presets

    if sum(source is not None for source in (args.name, args.hf_config, args.config)) != 1:
        raise ValueError(f"{args.command}: give a preset NAME, --hf-config PATH or --config FILE (exactly one)")
    if args.hf_config is not None:
        from smoe.interop.hf_config import load_hf_config

        return load_hf_config(args.hf_config)
    if args.config is not None:
        from smoe.train.rundir import read_run_config

        return read_run_config(args.config)[0]
    return presets.get(args.name)


def dtype_of(name: str | None):
    """The torch dtype a --dtype choice names (None: not given)."""
    from smoe.interop.hf import DTYPES

    return DTYPES.get(name)
