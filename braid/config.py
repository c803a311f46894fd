"""Frozen configuration, built once at the edge (constructor or CLI) and passed down.

CLI flags are generated from the dataclass fields (``add_cli_args`` / ``from_cli_args``): the field
name, its default and its one-line ``help`` metadata are the single source for all three.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from braid.errors import InvalidRequestError


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EngineConfig:
    """Everything an Engine needs. Derived values are properties; nothing is mutated after build."""

    model_path: str | None = _opt(None, "HF folder or .gguf file; unset = the embedded SmolLM2-135M-Instruct")
    dtype: str = _opt("auto", "weights/KV dtype: auto | float32 | bfloat16 | float16 (auto = float32 on CPU)")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")
    attention_backend: str = _opt(
        "auto",
        "attention and fused kernels: torch | triton (CUDA, or CPU under TRITON_INTERPRET=1);"
        " auto = triton on CUDA when triton imports, else torch",
    )
    grammar_backend: str = _opt(
        "auto", "constrained decoding backend: auto (llguidance,xgrammar with the llguidance extra, else xgrammar)"
        " | xgrammar | outlines | llguidance, or a fallback order such as xgrammar,outlines"
    )
    disable_jump_forward: bool = _opt(False, "append grammar-forced text token by token instead of in one step")
    grammar_compile_timeout: float = _opt(10.0, "seconds a grammar may take to compile before its request fails")
    schedule_policy: str = _opt("lpm", "waiting-queue order: lpm (longest cached prefix first) | fcfs")
    chunked_prefill_size: int = _opt(
        2048, "max prompt tokens in one extend batch; longer prompts are chunked; -1 = off"
    )
    max_running_requests: int = _opt(256, "max requests decoding at once")
    max_total_tokens: int | None = _opt(
        None, "KV pool size in tokens; unset = 16384 on CPU, from mem_fraction_static on GPU"
    )
    mem_fraction_static: float = _opt(0.85, "GPU: fraction of free memory (after weights) given to the KV pool")
    context_len: int | None = _opt(None, "max tokens per request (prompt + output); unset = the model's limit")
    disable_radix_cache: bool = _opt(False, "turn prefix caching off")
    disable_cuda_graph: bool = _opt(False, "run decode eagerly instead of replaying captured CUDA graphs (GPU only)")
    disable_cascade_attention: bool = _opt(
        False, "read a prefix the running requests share once per decode step (and per extend on the torch"
        " backend), not once per request"
    )
    cuda_graph_max_bs: int = _opt(256, "largest decode batch captured as a CUDA graph; larger batches run eagerly")
    disable_overlap_schedule: bool = _opt(
        False, "CUDA: take each decode step's (and prefill chunk's) tokens on the host before launching the next, "
        "not while it runs"
    )
    cpu_threads: int = _opt(0, "torch intra-op threads; 0 = auto (cores - 1, at least 1, at most 8): see docs")
    new_token_ratio: float = _opt(0.4, "fraction of a running request's remaining max_new_tokens reserved at admission")
    random_seed: int = _opt(0, "seed of the shared generator used by requests without their own seed")
    cache_dir: str | None = _opt(None, "where converted GGUF models are cached; unset = $BRAID_CACHE or ~/.cache/braid")
    tp_size: int = field(default=1, metadata={
        "help": "tensor-parallel ranks, one process each (NCCL on GPUs, gloo on the CPU); see docs/scale-out.md",
        "aliases": ("--tp",)})  # fmt: skip
    nnodes: int = _opt(1, "machines the tensor-parallel ranks span (tp_size / nnodes ranks on each)")
    node_rank: int = _opt(0, "this machine's index among nnodes; nodes other than 0 run only tensor-parallel workers")
    dist_init_addr: str | None = _opt(
        None, "HOST:PORT where node 0 meets the other ranks (torch.distributed TCP store); unset = a free port"
        " on 127.0.0.1 (one node only)"
    )

    def __post_init__(self) -> None:
        _check_field_types(self)
        checks = [
            ("chunked_prefill_size", self.chunked_prefill_size == -1 or self.chunked_prefill_size >= 1, "-1 or >= 1"),
            ("max_running_requests", self.max_running_requests >= 1, ">= 1"),
            ("cuda_graph_max_bs", self.cuda_graph_max_bs >= 1, ">= 1"),
            ("max_total_tokens", self.max_total_tokens is None or self.max_total_tokens >= 16, ">= 16 or unset"),
            ("mem_fraction_static", 0.0 < self.mem_fraction_static < 1.0, "in (0, 1)"),
            ("context_len", self.context_len is None or self.context_len >= 2, ">= 2 or unset"),
            ("cpu_threads", self.cpu_threads >= 0, ">= 0"),
            ("grammar_compile_timeout", self.grammar_compile_timeout > 0, "> 0"),
            ("new_token_ratio", 0.0 <= self.new_token_ratio <= 1.0, "in [0, 1]"),
            ("tp_size", self.tp_size >= 1, ">= 1"),
            ("nnodes", self.nnodes >= 1, ">= 1"),
            ("tp_size", self.nnodes < 1 or self.tp_size % self.nnodes == 0, f"a multiple of nnodes ({self.nnodes})"),
            ("node_rank", 0 <= self.node_rank < self.nnodes, f"0 .. nnodes - 1 ({self.nnodes - 1})"),
            ("dist_init_addr", self.dist_init_addr is not None or self.nnodes == 1, "HOST:PORT when nnodes > 1"),
            ("dist_init_addr", self.dist_init_addr is None or _is_host_port(self.dist_init_addr), "HOST:PORT"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise InvalidRequestError(name, f"got {getattr(self, name)!r}, allowed: {allowed}")

    @property
    def resolved_cache_dir(self) -> str:
        return self.cache_dir or os.environ.get("BRAID_CACHE") or os.path.expanduser("~/.cache/braid")

    @property
    def resolved_cpu_threads(self) -> int:
        # On a small CPU box the scheduler thread competes with the caller's thread, the tokenizer and
        # any other process; torch's default (all cores) measured ~7x slower decode when one core was busy.
        if self.cpu_threads:
            return self.cpu_threads
        return max(1, min(8, (os.cpu_count() or 2) - 1))


@dataclass(frozen=True)
class ServerConfig:
    """How ``braid serve`` listens; the engine's own settings are an EngineConfig."""

    host: str = _opt("127.0.0.1", "address to bind; 0.0.0.0 exposes the server to the network")
    port: int = _opt(30000, "TCP port")
    api_key: str | None = _opt(None, "require Authorization: Bearer KEY on every route but /health")
    served_model_name: str | None = _opt(None, "model id in /v1/models and responses; unset = the model's name")

    def __post_init__(self) -> None:
        _check_field_types(self)
        if not 0 <= self.port <= 65535:
            raise InvalidRequestError("port", f"got {self.port}, allowed: 0..65535")


def _is_host_port(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) <= 65535


def _check_field_types(config: Any) -> None:
    """Every field holds its annotated type (bool is not an int; an int is a fine float)."""
    hints = get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        allowed = typing.get_args(hint) or (hint,)
        ok = any(
            (value is None and t is type(None))
            or (t is bool and isinstance(value, bool))
            or (t is int and isinstance(value, int) and not isinstance(value, bool))
            or (t is float and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (t is str and isinstance(value, str))
            for t in allowed
        )
        if not ok:
            names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise InvalidRequestError(f.name, f"expected {names}, got {value!r}")


def add_cli_args(parser: argparse.ArgumentParser, cls: type = EngineConfig, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per dataclass field, with the field's default and help."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
        hint = hints[f.name]
        if hint is bool:
            parser.add_argument(*flags, action="store_true", default=f.default, help=f.metadata.get("help"))
            continue
        base = next((t for t in (int, float, str) if t == hint or str(t.__name__) in str(hint)), str)
        parser.add_argument(*flags, type=base, default=f.default, help=f.metadata.get("help"))


def from_cli_args(args: argparse.Namespace, cls: type = EngineConfig) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})
