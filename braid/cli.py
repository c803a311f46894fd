"""The ``braid`` command: ``braid run FILE.py``, ``braid generate "prompt"``, ``braid serve``
(extract and bench arrive with their issues)."""

from __future__ import annotations

import argparse
import json
import runpy
import sys

from braid.config import EngineConfig, ServerConfig, add_cli_args, from_cli_args
from braid.errors import BraidError


def _generate(args: argparse.Namespace) -> int:
    from braid.runtime.engine import Engine

    config = from_cli_args(args, EngineConfig)
    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    if args.seed is not None:
        params["seed"] = args.seed
    with Engine(**vars(config)) as eng:
        prompt = args.prompt
        if not args.raw and eng.tokenizer.has_chat_template:
            prompt = eng.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        if args.json:
            print(json.dumps(eng.generate(prompt=prompt, sampling_params=params)))
            return 0
        for piece in eng.generate(prompt=prompt, sampling_params=params, stream=True):
            print(piece["text"], end="", flush=True)
        print()
    return 0


def _serve(args: argparse.Namespace) -> int:
    from braid.server import serve

    serve(from_cli_args(args, EngineConfig), from_cli_args(args, ServerConfig))
    return 0


def _run(args: argparse.Namespace) -> int:
    sys.argv = [args.file, *args.args]
    runpy.run_path(args.file, run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="braid", description="braid: structured generation for LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a Python program file that uses braid")
    run.add_argument("file")
    run.add_argument("args", nargs=argparse.REMAINDER)
    run.set_defaults(func=_run)
    gen = sub.add_parser("generate", help="generate text for one prompt (chat template applied unless --raw)")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--json", action="store_true", help="print the whole result as JSON")
    add_cli_args(gen, EngineConfig)
    gen.set_defaults(func=_generate)
    srv = sub.add_parser("serve", help="serve the HTTP API (/generate, OpenAI /v1/*) on 127.0.0.1:30000")
    add_cli_args(srv, ServerConfig)
    add_cli_args(srv, EngineConfig)
    srv.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BraidError as exc:
        print(f"braid: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
