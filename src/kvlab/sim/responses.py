"""vLLM 0.32's response bodies, field by field: a whole completion or chat completion, and the
events of a stream (checked against captured responses in
tests/fixtures/vllm-0.32-cpu-llama-twin.http.jsonl)."""

from __future__ import annotations

from kvlab.sim.config import SIM_VERSION

FINGERPRINT = f"vllm-{SIM_VERSION}"


def completion(rid: str, created: int, model: str, choices: list[tuple[int, str, str | None]], usage: dict) -> dict:
    """/v1/completions' answer; choices: (index, text, finish_reason)."""
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None,
                     "token_ids": None, "prompt_logprobs": None, "prompt_token_ids": None, "routed_experts": None}
                    for i, text, finish in choices],
        "service_tier": None, "system_fingerprint": FINGERPRINT, "usage": usage,
        "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}


def chat_completion(rid: str, created: int, model: str, choices: list[tuple[int, str, str | None]], usage: dict) -> dict:
    """/v1/chat/completions' answer; choices: (index, text, finish_reason)."""
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None,
                                             "annotations": None, "audio": None, "function_call": None,
                                             "reasoning": None},
                     "logprobs": None, "finish_reason": finish, "stop_reason": None, "token_ids": None,
                     "routed_experts": None} for i, text, finish in choices],
        "service_tier": None, "system_fingerprint": FINGERPRINT, "usage": usage,
        "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None, "kv_transfer_params": None,
        "ec_transfer_params": None, "metrics": None}


def usage(prompt_tokens: int, completion_tokens: int, chat: bool, stream: bool, details: bool,
          cached_tokens: int | None, created_cache_tokens: int | None) -> dict:
    """A request's usage; `details`: --enable-prompt-tokens-details (cached and, for chat, created
    cache tokens)."""
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
             "completion_tokens": completion_tokens}
    prompt_details = None
    if details:
        if not stream:
            prompt_details = {"cached_tokens": cached_tokens, "created_cache_tokens": created_cache_tokens,
                              "multimodal_tokens": None}
        elif chat:
            prompt_details = {"cached_tokens": cached_tokens, "created_cache_tokens": created_cache_tokens}
        else:
            prompt_details = {"cached_tokens": cached_tokens}
    if stream:
        if prompt_details is not None:
            usage["prompt_tokens_details"] = prompt_details
    else:
        usage["prompt_tokens_details"] = prompt_details
        usage["completion_tokens_details"] = None
    return usage


def stream_head(rid: str, created: int, model: str, chat: bool) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model}


def chunk_usage(prompt_tokens: int, completion_tokens: int, chat: bool) -> dict:
    """The usage of one event (`continuous_usage_stats`)."""
    u = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
         "completion_tokens": completion_tokens}
    if chat:
        u["completion_tokens_details"] = None
    return u


def role_event(head: dict, index: int, usage: dict | None) -> dict:
    """A chat stream's first event of a choice: the assistant role, no content yet."""
    event = {**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}]}
    if usage is not None:
        event["usage"] = usage
    event.update({"prompt_token_ids": None, "prompt_text": None})
    return event


def token_event(head: dict, index: int, text: str, done: bool, chat: bool, fingerprint: bool,
                usage: dict | None) -> dict:
    """One token of one choice; the last says finish_reason "length" (and the fingerprint when no
    usage event follows)."""
    finish = "length" if done else None
    if chat:
        c = {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
    else:
        c = {"index": index, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}
    if done:
        c["stop_reason"] = None
    if chat:
        c["token_ids"] = None
    else:
        c.update({"prompt_token_ids": None, "token_ids": None})
    event = {**head, "choices": [c]}
    if done and fingerprint:
        event["system_fingerprint"] = FINGERPRINT
    if usage is not None:
        event["usage"] = usage
    return event


def usage_event(head: dict, usage: dict) -> dict:
    """A stream's last event before [DONE] with `include_usage`."""
    return {**head, "choices": [], "usage": usage, "system_fingerprint": FINGERPRINT}
