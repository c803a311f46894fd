"""The ``braid`` command: ``braid run FILE.py``, ``braid generate "prompt"``, ``braid serve``,
``braid extract`` (bench arrives with its issue)."""

from __future__ import annotations

import argparse
import json
import runpy
import sys

from braid.config import EngineConfig, ServerConfig, add_cli_args, from_cli_args
from braid.errors import BraidError, InvalidRequestError


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
    engine, server = from_cli_args(args, EngineConfig), from_cli_args(args, ServerConfig)
    if engine.node_rank > 0:  # tensor-parallel ranks of another node: no server, no scheduler
        from braid.runtime.tp_worker import run_node

        return run_node(engine)
    if args.dp is not None:
        from braid.server.dp import DPConfig, serve_dp

        if args.dp < 1:
            raise InvalidRequestError("dp", f"expected at least 1 replica, got {args.dp}")
        return serve_dp(engine, server, DPConfig(args.dp, args.router_policy, args.router_metrics_port,
                                                 args.router_args))
    from braid.server import serve

    serve(engine, server)
    return 0


def _add_dp_args(srv: argparse.ArgumentParser) -> None:
    dp = srv.add_argument_group("data parallel (docs/scale-out.md; needs: pip install 'braid[router]')")
    dp.add_argument("--dp", type=int, default=None, help="run N replicas behind the SGLang router (smg) on "
                                                         "--host/--port; replicas listen on loopback ports")
    dp.add_argument("--router-policy", default="cache_aware", help="smg's --policy (default: cache_aware)")
    dp.add_argument("--router-metrics-port", type=int, default=None, help="smg's Prometheus port, bound to "
                                                                          "127.0.0.1 (default: a free port)")
    dp.add_argument("--router-args", default="", help="more `smg launch` flags, as one quoted string")


def _extract(args: argparse.Namespace) -> int:
    from braid.jobs import extract

    # only the flags given: with --endpoint any engine flag is an error, not silently unused
    engine_args = {k: v for k, v in vars(from_cli_args(args, EngineConfig)).items()
                   if v != EngineConfig.__dataclass_fields__[k].default}
    model_path = engine_args.pop("model_path", None)
    summary = extract(
        args.schema, args.input, args.output, text_field=args.text_field, id_field=args.id_field,
        instruction=args.instruction, prompt_file=args.prompt_file, model_path=model_path,
        endpoint=args.endpoint, api_key=args.api_key, engine_args=engine_args,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, limit=args.limit, window=args.window,
        retry_errors=args.retry_errors, ray=args.ray, ray_workers=args.ray_workers, ray_address=args.ray_address,
        progress=not args.no_progress,
    )  # fmt: skip
    print(json.dumps(summary.as_dict()) if args.json else summary.format())
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
    _add_dp_args(srv)
    srv.set_defaults(func=_serve)
    _add_extract(sub)
    return parser


def _add_extract(sub) -> None:
    ext = sub.add_parser(
        "extract", help="run a JSON schema over many documents: one validated JSON record per document, resumable",
        description="Each document of --input gets one line in --output: {\"id\", \"data\"} (valid under the "
                    "schema) or {\"id\", \"error\"}. Rerunning with the same --output resumes.",
    )  # fmt: skip
    ext.add_argument("--schema", required=True, help="schema.json, or module:PydanticModel (or module:DICT)")
    ext.add_argument("--input", required=True, help="a .jsonl file (one object per line) or a folder of .txt/.md "
                                                    "files (id = relative path)")
    ext.add_argument("--output", required=True, help="the .jsonl file to append records to (its folder must exist)")
    ext.add_argument("--text-field", default="text", help="JSONL field holding the document (default: text)")
    ext.add_argument("--id-field", default="id", help="JSONL field holding the document id (default: id)")
    how = ext.add_mutually_exclusive_group()
    how.add_argument("--instruction", default=None, help="the instruction before the schema (default: a generic "
                                                          "extraction instruction)")
    how.add_argument("--prompt-file", default=None, help="read the instruction from this file")
    ext.add_argument("--endpoint", default=None, help="URL of a braid serve to use instead of a local engine")
    ext.add_argument("--api-key", default=None, help="API key for --endpoint")
    ext.add_argument("--max-new-tokens", type=int, default=512, help="per document (default: 512)")
    ext.add_argument("--temperature", type=float, default=0.0)
    ext.add_argument("--limit", type=int, default=None, help="only the first N documents of the input")
    ext.add_argument("--window", type=int, default=None, help="documents in flight (default: 256 on a local "
                                                               "engine, 64 on an endpoint)")
    ext.add_argument("--retry-errors", action="store_true", help="redo the documents whose records are errors")
    ext.add_argument("--ray", action="store_true", help="run on Ray Data actors, each owning an Engine")
    ext.add_argument("--ray-workers", type=int, default=None, help="Ray actors (default: one per GPU, else 1)")
    ext.add_argument("--ray-address", default=None, help="Ray cluster address (default: a local Ray, or the "
                                                          "RAY_ADDRESS one)")
    ext.add_argument("--no-progress", action="store_true", help="no progress bar")
    ext.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_cli_args(ext, EngineConfig)
    ext.set_defaults(func=_extract)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BraidError as exc:
        print(f"braid: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
