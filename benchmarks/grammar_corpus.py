"""The grammar corpus (tests/data/grammar_corpus.json) through each backend on the default
model's tokenizer, on the CPU: compile time, per-token mask time, and random walks under braid's
full mask (grammar + bans), whose finished outputs are validated (jsonschema, formats checked)
or matched in full.

    python -m benchmarks.grammar_corpus [--backends xgrammar,outlines] [--walks 8] [--max-tokens 384]

A walk picks, at each step, a uniformly random allowed token half of the time and a random
allowed single-byte token otherwise (punctuation closes strings and objects), and takes a stop
token whenever one is allowed with probability 1/2: random text that still reaches the end.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch

from braid.errors import InvalidRequestError
from braid.grammar import GrammarError, GrammarSpec
from braid.grammar.validate import validate_json
from braid.runtime.constraints import Constraints
from braid.runtime.sampling_params import SamplingParams

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "grammar_corpus.json"


def items(schemas_dir: str | None = None) -> list[tuple[str, str, object]]:
    """(kind, name, spec) of the corpus, or of every ``*.json`` schema file in ``schemas_dir``."""
    if schemas_dir:
        return [("json_schema", p.stem, json.loads(p.read_text())) for p in sorted(Path(schemas_dir).glob("*.json"))]
    data = json.loads(CORPUS.read_text())
    return ([("json_schema", s["name"], s["schema"]) for s in data["schemas"]]
            + [("regex", r["name"], r["regex"]) for r in data["regexes"]])  # fmt: skip


def walk(constraints: Constraints, params: SamplingParams, rng: random.Random, max_tokens: int,
         single_byte: torch.Tensor, stops: list[int]) -> tuple[list[int] | None, list[float]]:
    """(token ids, or None if cut off at max_tokens; mask seconds per step)."""
    req = SimpleNamespace(matcher=constraints.matcher(params), params=params)
    ids, times = [], []
    for _ in range(max_tokens):
        t0 = time.perf_counter()
        _, _, bitmask = constraints._build_masks([req])
        times.append(time.perf_counter() - t0)
        bits = (bitmask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
        allowed = bits.reshape(-1)[: constraints.vocab_size].bool()
        stop = [t for t in stops if allowed[t]]
        if stop and rng.random() < 0.5:
            tok = stop[0]
        else:
            pool = allowed & single_byte if rng.random() < 0.5 and bool((allowed & single_byte).any()) else allowed
            choices = torch.nonzero(pool).flatten().tolist()
            tok = rng.choice(choices)
        assert req.matcher.accept_token(tok), "the matcher refused a token its own mask allowed"
        ids.append(tok)
        if req.matcher.is_terminated():
            return ids[:-1], times
    return None, times


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="xgrammar,outlines",
                    help="comma-separated; a fallback order is written with +: llguidance+xgrammar; "
                         "auto: the engine's default order")
    ap.add_argument("--walks", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--model", default=None, help="HF folder whose tokenizer to use; default: the embedded model")
    ap.add_argument("--schemas-dir", default=None, help="measure these *.json schemas instead of the corpus")
    ap.add_argument("--timeout", type=float, default=60.0, help="compile time budget per spec, seconds")
    return ap.parse_args()


def main() -> None:
    a = parse_args()
    from braid.runtime.model_source import resolve_model_path
    from braid.runtime.tokenizer import Tokenizer

    tok = Tokenizer(a.model or resolve_model_path(None))
    vocab = len(tok)
    single = torch.tensor([len(tok.decode([i]).encode()) == 1 for i in range(vocab)])
    stops = sorted(tok.eos_token_ids)
    corpus = items(a.schemas_dir)
    print(f"corpus: {sum(k == 'json_schema' for k, _, _ in corpus)} schemas, "
          f"{sum(k == 'regex' for k, _, _ in corpus)} regexes; tokenizer {vocab} tokens; {a.walks} walks each")
    print(f"{'backend':>9} {'kind':>11} {'compiled':>9} {'compile p50/p99 ms':>19} {'mask p50/p99 us':>16} "
          f"{'finished':>9} {'valid':>7}")
    for backend in a.backends.split(","):
        failures = []
        for kind in ("json_schema", "regex"):
            constraints = Constraints(backend.replace("+", ","), tok, vocab, compile_timeout_s=a.timeout)
            constraints.ban_words(SamplingParams())  # tables built before timing starts
            compile_ms, mask_s, n, ok, finished, valid = [], [], 0, 0, 0, 0
            by_backend: Counter[str] = Counter()  # which backend of a fallback order compiled each spec
            for k, name, spec in corpus:
                if k != kind:
                    continue
                n += 1
                t0 = time.perf_counter()
                try:
                    params = SamplingParams(**{kind: spec})
                    compiled = constraints.cache.compiled(GrammarSpec(kind, params.constraint.spec))
                except (GrammarError, InvalidRequestError) as e:
                    failures.append(f"{name}: not compiled: {e.problem[:150]}")
                    continue
                compile_ms.append((time.perf_counter() - t0) * 1e3)
                ok += 1
                by = getattr(getattr(compiled, "backend", None), "name", backend)
                by_backend[by] += 1
                rng = random.Random(name)
                for _ in range(a.walks):
                    ids, times = walk(constraints, params, rng, a.max_tokens, single, stops)
                    mask_s += times
                    if ids is None:
                        continue
                    finished += 1
                    text = tok.decode(ids)
                    good, error = (validate_json(text, params.json_schema) if kind == "json_schema"
                                   else (re.fullmatch(spec, text) is not None, "no full match"))
                    valid += good
                    if not good:
                        failures.append(f"{name}: invalid walk on {by} ({error[:100]}) {text[:80]!r}")
            if n == 0:
                continue
            cq = statistics.quantiles(compile_ms, n=100) if len(compile_ms) > 1 else (compile_ms or [0.0]) * 99
            mq = statistics.quantiles(mask_s, n=100) if len(mask_s) > 1 else (mask_s or [0.0]) * 99
            print(f"{backend:>9} {kind:>11} {ok:>4}/{n:<4} {cq[49]:>9.1f} / {cq[98]:<7.1f} "
                  f"{mq[49] * 1e6:>7.0f} / {mq[98] * 1e6:<6.0f} {finished:>4}/{ok * a.walks:<4} "
                  f"{valid / max(finished, 1):>7.1%}")
            if len(by_backend) > 1 or backend not in by_backend:
                print(f"{'':>21} compiled by " + ", ".join(f"{b} {c}" for b, c in by_backend.most_common()))
        for f in failures:
            print(f"  {backend}: {f}")


if __name__ == "__main__":
    main()
