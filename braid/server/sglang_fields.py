"""SGLang's request fields that braid accepts without using them, so SGLang clients and the SGLang
router (which rebuilds every body it forwards, adding SGLang's own fields) get answers instead of
400s, while a truly unknown field is still a 400 naming it.

Two kinds, for ``/generate``, its ``sampling_params``, and the OpenAI routes:

- ``*_IGNORED``: routing, logging, tracing, disaggregation and multimodal-tuning fields. On a
  text-only model served by one process they cannot change the generated text, so any value is
  accepted and dropped.
- ``*_REFUSED``: fields that would change the output, or ask for outputs braid cannot give. Their
  "unset" value (null, false, empty) is what the router and SGLang clients send by default and is
  accepted; anything else is a 400 naming the field and saying why.

Names follow SGLang's ``GenerateReqInput``, ``SamplingParams`` and OpenAI protocol models (the
router adds ``model`` to ``/generate``); docs/server.md lists them with the reasons.
"""

from __future__ import annotations

from typing import Any

from braid.errors import InvalidRequestError

# ---- POST /generate, top level ---------------------------------------------------------------------
GENERATE_IGNORED = (
    "model",  # the router names the model it routed to; one server serves one model
    "session_id", "conversation_id", "routing_key", "extra_key", "cache_salt", "priority",
    "log_metrics", "no_logs", "custom_labels", "external_trace_header", "received_time", "background",
    "return_text_in_logprobs",  # logprob entries carry null in the text slot either way
    "return_bytes", "return_entropy", "return_prompt_token_ids", "require_reasoning",
    "max_thinking_tokens", "ngram_corpus_id",
    # data-parallel ranks, prefill/decode disaggregation, KV routing hints: one process, no peers
    "routed_dp_rank", "data_parallel_rank", "disagg_prefill_dp_rank", "bootstrap_host",
    "bootstrap_port", "bootstrap_room", "bootstrap_pair_key", "decode_tp_size", "kv_router_hint",
    "http_worker_ipc", "lora_id",
    # multimodal tuning: meaningless without multimodal input (which is refused below)
    "modalities", "use_audio_in_video", "video_config", "mm_hashes", "mm_content_hashes",
    "need_wait_for_mm_inputs", "num_items_assigned", "encoder_urls", "max_dynamic_patch",
    "min_dynamic_patch", "image_max_dynamic_patch", "video_max_dynamic_patch", "images_config",
)  # fmt: skip
GENERATE_REFUSED = {
    "input_embeds": "prompt embeddings are not supported by braid; send text or input_ids",
    "image_data": "braid serves text-only models",
    "video_data": "braid serves text-only models",
    "audio_data": "braid serves text-only models",
    "lora_path": "LoRA adapters are not supported by braid",
    "custom_logit_processor": "custom logit processors are not supported by braid",
    "positional_embed_overrides": "embedding overrides are not supported by braid",
    "session_params": "sessions are not supported by braid (the radix cache reuses shared prefixes)",
    "token_ids_logprob": "logprobs of chosen token ids are not supported by braid; use top_logprobs_num",
    "return_sampling_mask": "not supported by braid",
    "return_flat_raw_top_logprobs": "not supported by braid",
    "return_flat_raw_top_logprobs_b64": "not supported by braid",
    "return_hidden_states": "hidden states are not returned by braid",
    "return_routed_experts": "not supported by braid",
    "routed_experts_start_len": "not supported by braid",
    "return_indexer_topk": "not supported by braid",
    "multi_item_delimiter_indices": "multi-item scoring is not supported by braid",
}

# ---- sampling_params keys SGLang knows and braid's engine does not ---------------------------------
SAMPLING_IGNORED = (
    "spaces_between_special_tokens",  # braid's detokenizer has one spacing rule
    "stream_interval",  # braid streams every token that adds text
    "custom_params",  # read only by custom logit processors, which are refused
)
SAMPLING_REFUSED = {
    "stop_regex": "regex stop conditions are not supported by braid; use stop strings",
    "no_stop_trim": "braid always trims the matched stop string",
    "logit_bias": "not supported by braid",
    "structural_tag": "structural tags are not supported by braid; use json_schema, regex or ebnf",
}
SAMPLING_RENAMED = {"sampling_seed": "seed"}

# ---- the OpenAI routes' SGLang extensions ----------------------------------------------------------
OPENAI_IGNORED = (
    "rid", "extra_key", "cache_salt", "ngram_corpus_id", "priority", "custom_labels", "custom_params",
    "session_id", "routed_dp_rank", "disagg_prefill_dp_rank", "data_parallel_rank", "bootstrap_host",
    "bootstrap_port", "bootstrap_room", "images_config", "return_cached_tokens_details",
    "routed_experts_start_len",
    # chat only: braid has no reasoning parser and serves text-only models
    "separate_reasoning", "stream_reasoning", "reasoning", "max_dynamic_patch", "min_dynamic_patch",
    "use_audio_in_video",
)  # fmt: skip
OPENAI_REFUSED = {
    "stop_regex": SAMPLING_REFUSED["stop_regex"],
    "no_stop_trim": SAMPLING_REFUSED["no_stop_trim"],
    "lora_path": GENERATE_REFUSED["lora_path"],
    "session_params": GENERATE_REFUSED["session_params"],
    "custom_logit_processor": GENERATE_REFUSED["custom_logit_processor"],
    "return_hidden_states": GENERATE_REFUSED["return_hidden_states"],
    "return_routed_experts": "not supported by braid",
    "return_token_ids": "not supported by braid; use /generate, which returns output_ids",
    "return_prompt_token_ids": "not supported by braid; use /tokenize",
    "return_meta_info": "not supported by braid; use /generate, which returns meta_info",
    "chat_template_kwargs": "braid renders the model's chat template without extra variables",
    "continue_final_message": "braid always opens a new assistant turn",
    "task": "not supported by braid",
}


def is_unset(value: Any) -> bool:
    """The values clients send for "not asked for": null, false, 0, empty."""
    return value is None or value is False or value == 0 or value in ("", [], {})


def refuse_set(obj: Any, refused: dict[str, str]) -> None:
    """A 400 naming the first field of ``refused`` that ``obj`` sets to something."""
    for name, why in refused.items():
        if not is_unset(getattr(obj, name, None)):
            raise InvalidRequestError(name, why)


def engine_sampling(params: Any) -> Any:
    """``/generate``'s sampling_params (a dict or a list of them) with SGLang's extra keys dropped
    or refused; anything else is left for the engine to judge."""
    if isinstance(params, list):
        return [engine_sampling(p) for p in params]
    if not isinstance(params, dict):
        return params
    out = {}
    for key, value in params.items():
        if key in SAMPLING_IGNORED:
            continue
        if key in SAMPLING_REFUSED:
            if not is_unset(value):
                raise InvalidRequestError(key, SAMPLING_REFUSED[key])
            continue
        if key in SAMPLING_RENAMED:
            if value is not None and params.get(SAMPLING_RENAMED[key]) is None:
                out[SAMPLING_RENAMED[key]] = value
            continue
        out[key] = value
    return out


def one_for_batch(name: str, value: Any) -> Any:
    """SGLang lets a batch give a per-prompt flag; braid takes one value for the whole batch."""
    if not isinstance(value, list):
        return value
    if not value or any(v != value[0] for v in value):
        raise InvalidRequestError(name, "must be one value for the whole batch in braid (got differing values)")
    return value[0]
