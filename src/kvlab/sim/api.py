"""vLLM's OpenAI-compatible requests, read as vLLM 0.32 reads them: the body checks in its order,
and the error object (status, message, type, param) it answers a bad request with."""

from __future__ import annotations

import json
import math

from aiohttp import web

from kvlab.sim import tokens


def dumps(obj) -> str:
    """JSON as vLLM writes it (pydantic's compact form)."""
    return json.dumps(obj, separators=(",", ":"))


def json_response(obj, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status, dumps=dumps)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, value=None, kind: str = "BadRequestError"):
        if value is not None:
            message = f"{message} (parameter={param}, value={value})"
        elif param is not None and kind == "BadRequestError":
            message = f"{message} (parameter={param})"
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> web.Response:
        return json_response({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                         "code": self.status}}, status=self.status)


async def read_json(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "1 validation error:\n  {'type': 'json_invalid', 'loc': 'body.0', "
                            "'msg': 'JSON decode error'}", "body.0", kind="Bad Request") from None
    if not isinstance(body, dict):
        raise ApiError(400, "1 validation error:\n  {'type': 'model_attributes_type', 'loc': 'body', "
                            "'msg': 'Input should be a valid dictionary or object to extract fields from'}",
                       "body", kind="Bad Request")
    return body


def served_model(body: dict, names: list[str]) -> str:
    """The model a request names (the first served name when it names none)."""
    model = body.get("model")
    if model is None:
        return names[0]
    if model not in names:
        raise ApiError(404, f"The model `{model}` does not exist. Valid aliases: {', '.join(names)}.", "model",
                       kind="NotFoundError")
    return model


def chat_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
        raise ApiError(400, "1 validation error:\n  {'type': 'list_type', 'loc': 'body.messages', "
                            "'msg': 'Input should be a valid list'}", "body.messages", kind="Bad Request")
    return msgs


def prompt_ids(prompt, param: str, max_model_len: int) -> list[list[int]]:
    """Token ids of each prompt: a string, a list of strings, token ids, or lists of ids."""
    if prompt is None or prompt == "" or prompt == []:
        raise ApiError(400, "Either prompt or prompt_embeds must be provided and non-empty.", param)
    if isinstance(prompt, str):
        return [checked_length(tokens.encode(prompt), True, max_model_len)]
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return [checked_length(list(prompt), False, max_model_len)]
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return [checked_length(tokens.encode(p), True, max_model_len) for p in prompt]
    if isinstance(prompt, list) and all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
        return [checked_length(list(p), False, max_model_len) for p in prompt]
    raise ApiError(400, "prompt must be a string, a list of strings, or token ids", param)


def tokenize_prompt(body: dict) -> str:
    """/tokenize's `prompt`: a string (vLLM's TokenizeCompletionRequest)."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, "1 validation error:\n  {'type': 'string_type', 'loc': 'body.prompt', "
                            "'msg': 'Input should be a valid string'}", "body.prompt", kind="Bad Request")
    return prompt


def token_ids(body: dict) -> list[int]:
    """/detokenize's `tokens`: a list of integers (vLLM's DetokenizeRequest)."""
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ApiError(400, "1 validation error:\n  {'type': 'list_type', 'loc': 'body.tokens', "
                            "'msg': 'Input should be a valid list of integers'}", "body.tokens", kind="Bad Request")
    return ids


def checked_length(ids: list[int], text: bool, max_model_len: int) -> list[int]:
    if len(ids) > max_model_len:
        # vLLM's tokenizer truncates text to max_model_len + 1 before this check.
        count = max_model_len + 1 if text else len(ids)
        qualifier = "at least " if count == max_model_len + 1 else ""
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
                            f"contains {qualifier}{count} input tokens, which exceeds this limit even without any "
                            "output tokens. Please reduce the length of the input prompt.", "input_tokens", count)
    return ids


def max_tokens(body: dict, default: int | None, chat: bool, max_model_len: int) -> int | None:
    """The requested output length (`max_completion_tokens` before `max_tokens` in chat), refused
    when over max_model_len (vLLM's TokenizeParams); values under 1 are refused later, by
    `sampling_checks`, as vLLM's SamplingParams does."""
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, f"{key} must be an integer", key, value)
    if value > max_model_len:
        raise ApiError(400, f"{key}={value} cannot be greater than max_model_len={max_model_len}. "
                            "Please request fewer output tokens.", key, value)
    return value


def output_limit(requested: int | None, prompt_len: int, max_model_len: int) -> int:
    """The max_tokens the engine gets: the request's, capped at what the context has left (vLLM
    0.32's `get_max_tokens`: a prompt plus max_tokens over max_model_len is shortened, not refused)."""
    room = max_model_len - prompt_len
    return room if requested is None else min(requested, room)


def num_choices(body: dict) -> int:
    n = body.get("n", 1)
    return 1 if n is None else n


# vLLM 0.32's defaults for the sampling values a request leaves out (CompletionRequest /
# ChatCompletionRequest `_DEFAULT_SAMPLING_PARAMS`).
SAMPLING_DEFAULTS = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                     "temperature": 1.0, "top_p": 1.0, "min_p": 0.0}
GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: a lower temperature is greedy sampling
MAX_N_SEQUENCES = 16384  # VLLM_MAX_N_SEQUENCES' default


def _float(body: dict, key: str) -> float:
    """A float field as pydantic reads it (an int becomes a float: -1 is reported as -1.0)."""
    value = body.get(key)
    if value is None:
        return SAMPLING_DEFAULTS[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = "float_parsing" if isinstance(value, str) else "float_type"
        raise ApiError(400, f"1 validation error:\n  {{'type': '{kind}', 'loc': 'body.{key}', "
                            "'msg': 'Input should be a valid number'}", f"body.{key}", kind="Bad Request")
    return float(value)


def _int(body: dict, key: str, default: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"1 validation error:\n  {{'type': 'int_type', 'loc': 'body.{key}', "
                            "'msg': 'Input should be a valid integer'}", f"body.{key}", kind="Bad Request")
    return value


def sampling_checks(body: dict, n: int, max_tokens: int) -> None:
    """The checks of vLLM 0.32's `SamplingParams._verify_args`, in its order and with its
    messages, for the sampling values a request can carry; `max_tokens` is the engine's (after
    `output_limit`)."""
    _check_n(n)
    temperature = _check_sampling_values(body)
    _check_lengths(body, max_tokens)
    if temperature < GREEDY_EPS and n > 1:
        raise ApiError(400, f"n must be 1 when using greedy sampling, got {n}.")


def _check_n(n) -> None:
    if not isinstance(n, int) or isinstance(n, bool):
        raise ApiError(400, f"n must be an int, but is of type {type(n)}")
    if n < 1:
        raise ApiError(400, f"n must be at least 1, got {n}.")
    if n > MAX_N_SEQUENCES:
        raise ApiError(400, f"n must be at most {MAX_N_SEQUENCES}, got {n}. To increase this limit, set the "
                            "VLLM_MAX_N_SEQUENCES environment variable.")


def _check_sampling_values(body: dict) -> float:
    """Penalties, temperature, top_p, top_k and min_p in vLLM's ranges; the temperature."""
    v = {k: _float(body, k) for k in SAMPLING_DEFAULTS}
    for key in ("presence_penalty", "frequency_penalty"):
        if not -2.0 <= v[key] <= 2.0:
            raise ApiError(400, f"{key} must be in [-2, 2], got {v[key]}.")
    rep = v["repetition_penalty"]
    if not math.isfinite(rep):
        raise ApiError(400, f"repetition_penalty must be a finite number, got {rep}.")
    if rep <= 0.0:
        raise ApiError(400, f"repetition_penalty must be greater than zero, got {rep}.")
    t = v["temperature"]
    if not math.isfinite(t):
        raise ApiError(400, f"temperature must be a finite number, got {t}.", "temperature", t)
    if t < 0.0:
        raise ApiError(400, f"temperature must be non-negative, got {t}.", "temperature", t)
    if t > 2.0:
        raise ApiError(400, f"temperature must be in [0, 2], got {t}.", "temperature", t)
    if not 0.0 < v["top_p"] <= 1.0:
        raise ApiError(400, f"top_p must be in (0, 1], got {v['top_p']}.", "top_p", v["top_p"])
    top_k = _int(body, "top_k", 0)
    if top_k < -1:
        raise ApiError(400, f"top_k must be 0 (disable), or at least 1, got {top_k}.")
    if not 0.0 <= v["min_p"] <= 1.0:
        raise ApiError(400, f"min_p must be in [0, 1], got {v['min_p']}.")
    return t


def _check_lengths(body: dict, max_tokens: int) -> None:
    """max_tokens (after `output_limit`), min_tokens and stop strings."""
    if max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens", max_tokens)
    min_tokens = _int(body, "min_tokens", 0)
    if min_tokens < 0:
        raise ApiError(400, f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
    if min_tokens > max_tokens:
        raise ApiError(400, f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.")
    stop = body.get("stop")
    if stop == "" or (isinstance(stop, list) and any(not s for s in stop)):
        raise ApiError(400, "stop cannot contain an empty string.")


def completion_request(body: dict, max_model_len: int) -> tuple[list[list[int]], list[int], int]:
    """/v1/completions: (prompts' token ids, each prompt's max_tokens after `output_limit`, n),
    checked in vLLM's order."""
    limit = max_tokens(body, 16, False, max_model_len)
    prompts = prompt_ids(body.get("prompt"), "prompt", max_model_len)
    return prompts, _limits(body, prompts, limit, max_model_len), num_choices(body)


def chat_request(body: dict, max_model_len: int) -> tuple[list[list[int]], list[int], int]:
    """/v1/chat/completions: ([the rendered chat's token ids], [its max_tokens], n), checked in
    vLLM's order."""
    prompt = checked_length(tokens.encode(tokens.render_chat(chat_messages(body))), True, max_model_len)
    limit = max_tokens(body, None, True, max_model_len)
    return [prompt], _limits(body, [prompt], limit, max_model_len), num_choices(body)


def _limits(body: dict, prompts: list[list[int]], limit: int | None, max_model_len: int) -> list[int]:
    """Each prompt's engine max_tokens, its sampling values checked as vLLM checks them per prompt."""
    out = []
    for ids in prompts:
        out.append(output_limit(limit, len(ids), max_model_len))
        sampling_checks(body, num_choices(body), out[-1])
    return out
