"""braid extract on many synthetic documents with a 10-field schema, on a random
Llama-3.1-8B-shaped bf16 model (a random model's words are noise; its costs are real).

    python -m benchmarks.extract_job [--docs 10000] [--baseline-docs 2000] [--hf-docs 64] [--dry-run]

Figures, all documents per second:
  braid          bd.extract over the JSONL file (instruction + schema first: one cached prefix)
  independent    the same documents as independent Engine.generate calls, the document first and
                 the instruction + schema after it (no prefix shared across documents), the same
                 number in flight: what a script that loops over documents gets from the same engine
  transformers   transformers `generate` with xgrammar's logits processor, padded batches of the
                 same prompts as braid's (no prefix cache), on the first --hf-docs documents
  floor          the FLOPs of the tokens that must be computed (prompt less cache hits, plus the
                 generated ones) at the matmul rate, plus one weight read per decode step of a
                 full window at the copy bandwidth, both measured in this run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import braid as bd
from benchmarks.common import copy_bandwidth_gbs, matmul_tflops, param_bytes, sync
from benchmarks.lang_workloads import Words
from benchmarks.make_random_llama import ensure_model
from braid.jobs.extract import DEFAULT_INSTRUCTION, ExtractSettings

SCHEMA = {
    "type": "object",
    "properties": {
        "invoice_number": {"type": "string", "pattern": "^INV-[0-9]{6}$", "description": "as printed"},
        "vendor": {"type": "string", "minLength": 1, "maxLength": 16, "description": "company that billed"},
        "customer": {"type": "string", "minLength": 1, "maxLength": 16, "description": "company billed"},
        "issue_date": {"type": "string", "format": "date", "description": "ISO date the invoice was issued"},
        "currency": {"type": "string", "enum": ["USD", "EUR", "GBP", "JPY", "CHF"]},
        "total_cents": {"type": "integer", "minimum": 0, "maximum": 1000000000},
        "line_items": {"type": "integer", "minimum": 0, "maximum": 500, "description": "number of lines"},
        "paid": {"type": "boolean"},
        "payment_terms": {"type": "string", "enum": ["net 15", "net 30", "net 60", "on receipt"]},
        "country": {"type": "string", "minLength": 2, "maxLength": 2, "description": "ISO 3166 code"},
    },
    "required": ["invoice_number", "vendor", "customer", "issue_date", "currency", "total_cents", "line_items", "paid",
                 "payment_terms", "country"],
    "additionalProperties": False,
}
INSTRUCTION = (DEFAULT_INSTRUCTION + " The documents are invoices and their covering letters, scanned and "
               "converted to text; fields may appear in any order, and amounts may be written with thousands "
               "separators or currency symbols, which you must normalise. When the document states no payment "
               "terms, use 'on receipt'. Dates are always given in ISO form in the output.")


def make_documents(path: str, count: int, words: Words, doc_tokens: int) -> None:
    rng = random.Random(1)
    with open(path, "w") as f:
        for i in range(count):
            head = (f"Invoice INV-{rng.randrange(10**6):06d} from Vendor{i % 97} to Customer{i % 89}, issued "
                    f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}, total {rng.randrange(10**5)}.{rng.randrange(100):02d}.")
            f.write(json.dumps({"id": i, "text": head + words.text(doc_tokens)}) + "\n")


def independent_calls(eng, path: str, count: int, settings: ExtractSettings, window: int) -> dict:
    """The documents as a plain loop of generate calls would send them: no shared prefix."""
    with open(path) as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(count), f)]
    tok = eng.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"{d}\n\n{settings.system_prompt}"}])
               for d in docs]
    params = {"json_schema": settings.schema_text, "max_new_tokens": settings.max_new_tokens, "temperature": 0}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(window) as pool:
        outs = list(pool.map(lambda p: eng.generate(prompt=p, sampling_params=params), prompts))
    seconds = time.perf_counter() - t0
    meta = [o["meta_info"] for o in outs]
    return {"docs": count, "seconds": seconds, "prompt_tokens": sum(m["prompt_tokens"] for m in meta),
            "cached_tokens": sum(m["cached_tokens"] for m in meta),
            "completion_tokens": sum(m["completion_tokens"] for m in meta),
            "valid": sum(bool(m.get("valid")) for m in meta)}


@torch.no_grad()
def transformers_docs(model_dir: str, path: str, count: int, settings: ExtractSettings, device, batch: int) -> dict:
    import xgrammar as xgr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=model.config.vocab_size)
    grammar = xgr.GrammarCompiler(info).compile_json_schema(settings.schema_text, any_whitespace=False)
    with open(path) as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(count), f)]
    prompts = [tok.apply_chat_template([{"role": "system", "content": settings.system_prompt},
                                        {"role": "user", "content": d}], tokenize=False, add_generation_prompt=True)
               for d in docs]

    def run(chunk: list[str]) -> int:
        enc = tok(chunk, return_tensors="pt", padding=True).to(device)
        out = model.generate(**enc, max_new_tokens=settings.max_new_tokens, do_sample=False,
                             logits_processor=[xgr.contrib.hf.LogitsProcessor(grammar)],
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        return int((out[:, enc.input_ids.shape[1]:] != tok.pad_token_id).sum())

    run(prompts[:2])  # warm-up
    sync(device)
    t0 = time.perf_counter()
    generated = sum(run(prompts[i : i + batch]) for i in range(0, len(prompts), batch))
    sync(device)
    return {"docs": count, "seconds": time.perf_counter() - t0, "completion_tokens": generated}


def floor_seconds(prompt: int, cached: int, generated: int, docs: int, window: int, weights: int, bw: float,
                  tflops: float) -> float:
    computed = prompt - cached + generated
    decode_steps = generated / max(1, min(window, docs))  # a full window decodes together
    return computed * 2 * (weights / 2) / (tflops * 1e12) + decode_steps * weights / (bw * 1e9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/llama31-8b-random")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--docs", type=int, default=10000)
    ap.add_argument("--baseline-docs", type=int, default=2000, help="documents for the independent-calls run")
    ap.add_argument("--hf-docs", type=int, default=64, help="documents for transformers (0 = skip)")
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--doc-tokens", type=int, default=150)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--skip-braid", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="tiny model and counts on the CPU: checks the script")
    ap.add_argument("--json-out", default=os.environ.get("OUT", "."), help="folder for extract_job.json")
    a = ap.parse_args()
    dev = torch.device("cpu" if a.dry_run else "cuda")
    if a.dry_run:
        a.docs, a.baseline_docs, a.hf_docs, a.doc_tokens, a.max_new_tokens, a.window = 12, 6, 2, 20, 48, 8
    bw = copy_bandwidth_gbs(dev, mbytes=64 if a.dry_run else 2048)
    tflops = matmul_tflops(dev, torch.bfloat16, n=512 if a.dry_run else 8192)
    ensure_model(a.model, 2 if a.dry_run else a.layers, dev, a.dry_run, vocab_size=49152)
    settings = ExtractSettings(json.dumps(SCHEMA), INSTRUCTION, a.max_new_tokens)
    work = tempfile.mkdtemp(prefix="braid-extract-bench-")
    docs_path = os.path.join(work, "docs.jsonl")
    results: dict = {"device": "CPU (dry run)" if a.dry_run else torch.cuda.get_device_name(), "copy_gbs": bw,
                     "matmul_tflops": tflops, "args": vars(a)}
    engine_args = dict(model_path=a.model, dtype="bfloat16", context_len=4096, device=dev.type,
                       max_running_requests=a.window, max_total_tokens=60000 if a.dry_run else None)
    with bd.Engine(**engine_args) as eng:
        weights = results["weights_bytes"] = param_bytes(eng.runner.model)
        make_documents(docs_path, max(a.docs, a.baseline_docs, a.hf_docs), Words(eng.tokenizer), a.doc_tokens)
        # warm-up: first-call costs (grammar compile, kernels, validators) out of the figures
        bd.extract(SCHEMA, docs_path, os.path.join(work, "warm.jsonl"), backend=eng, instruction=INSTRUCTION,
                   max_new_tokens=a.max_new_tokens, limit=8, progress=False)
        eng.flush_cache()
        if not a.skip_braid:
            s = bd.extract(SCHEMA, docs_path, os.path.join(work, "out.jsonl"), backend=eng, instruction=INSTRUCTION,
                           max_new_tokens=a.max_new_tokens, limit=a.docs, window=a.window, progress=False)
            results["braid"] = s.as_dict()
            print(f"braid: {s.processed} docs in {s.seconds:.1f} s = {s.documents_per_s:.2f} docs/s, "
                  f"{s.output_tokens_per_s:.0f} out tok/s, hit rate {s.cache_hit_rate:.1%}, valid "
                  f"{s.valid_fraction:.1%} {s.error_kinds}", flush=True)
            _save(a.json_out, results)
        eng.flush_cache()
        if a.baseline_docs:
            r = results["independent"] = independent_calls(eng, docs_path, a.baseline_docs, settings, a.window)
            print(f"independent calls: {r['docs']} docs in {r['seconds']:.1f} s = {r['docs'] / r['seconds']:.2f} "
                  f"docs/s, hit rate {r['cached_tokens'] / r['prompt_tokens']:.1%}", flush=True)
            _save(a.json_out, results)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if a.hf_docs:
        r = results["transformers"] = transformers_docs(a.model, docs_path, a.hf_docs, settings, dev, a.hf_batch)
        print(f"transformers: {r['docs']} docs in {r['seconds']:.1f} s = {r['docs'] / r['seconds']:.2f} docs/s",
              flush=True)
        _save(a.json_out, results)
    report(results, weights, bw, tflops, a.window)


def _save(folder: str, results: dict) -> None:
    with open(os.path.join(folder, "extract_job.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)


def report(results: dict, weights: int, bw: float, tflops: float, window: int) -> None:
    print(f"{results['device']}: copy {bw:.0f} GB/s, bf16 matmul {tflops:.0f} TFLOP/s, weights {weights / 1e9:.2f} GB")
    print(f"{'run':>14} {'docs':>6} {'docs/s':>8} {'hit rate':>8} {'out tok/s':>9} {'floor docs/s':>12}")
    b = results.get("braid")
    if b:
        floor = floor_seconds(b["prompt_tokens"], b["cached_tokens"], b["completion_tokens"], b["processed"], window,
                              weights, bw, tflops)
        print(f"{'braid':>14} {b['processed']:>6} {b['documents_per_s']:>8.2f} {b['cache_hit_rate']:>8.1%} "
              f"{b['output_tokens_per_s']:>9.0f} {b['processed'] / floor:>12.2f}")
    r = results.get("independent")
    if r:
        floor = floor_seconds(r["prompt_tokens"], r["cached_tokens"], r["completion_tokens"], r["docs"], window,
                              weights, bw, tflops)
        print(f"{'independent':>14} {r['docs']:>6} {r['docs'] / r['seconds']:>8.2f} "
              f"{r['cached_tokens'] / r['prompt_tokens']:>8.1%} {r['completion_tokens'] / r['seconds']:>9.0f} "
              f"{r['docs'] / floor:>12.2f}")
    r = results.get("transformers")
    if r:
        print(f"{'transformers':>14} {r['docs']:>6} {r['docs'] / r['seconds']:>8.2f} {'-':>8} "
              f"{r['completion_tokens'] / r['seconds']:>9.0f} {'-':>12}")


if __name__ == "__main__":
    main()
