"""``smoe serve``: an OpenAI-compatible HTTP server (smoe.serve, docs/serve.md); its flags are ServeConfig's."""

from __future__ import annotations

import argparse

from smoe.cli.flags import add_config_arguments, given
from smoe.offload.budget import OffloadConfig
from smoe.serve.config import ServeConfig


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server: continuous batching, streaming, /metrics",
                       description="Serve a model behind OpenAI's API: POST /v1/completions and /v1/chat/completions "
                                   "(stream: true as server-sent events), GET /v1/models, /health and /metrics "
                                   "(Prometheus, with tokens routed per expert). Requests are batched continuously "
                                   "over --max-batch cache rows; a request's tokens never depend on the others "
                                   "unless --dependent-rows. For speed: --quantize int8 --compile (--dependent-rows "
                                   "for one client as fast as one row). Needs the serve extra (pip install "
                                   "'smoe[serve]'). docs/serve.md")
    p.add_argument("path", help="a Hugging Face model directory, a smoe checkpoint, or a run directory (its latest "
                                "checkpoint); also the model name clients send")
    add_config_arguments(p, ServeConfig)
    add_config_arguments(p, OffloadConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from smoe.serve.server import serve

    serve(args.path, ServeConfig(**given(args, ServeConfig)), offload=OffloadConfig(**given(args, OffloadConfig)))
