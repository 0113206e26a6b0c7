"""vLLM's OpenAI-compatible requests, read as vLLM 0.32 reads them: the body checks in its order,
and the error object (status, message, type, param) it answers a bad request with."""

from __future__ import annotations

import json

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
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, f"{key} must be an integer", key, value)
    if value < 1:
        raise ApiError(400, f"{key} must be at least 1, got {value}.", key, value)
    if value > max_model_len:
        raise ApiError(400, f"{key}={value} cannot be greater than max_model_len={max_model_len}. "
                            "Please request fewer output tokens.", key, value)
    return value


def num_choices(body: dict) -> int:
    n = body.get("n", 1) or 1
    if not isinstance(n, int) or n < 1:
        raise ApiError(400, f"n must be at least 1, got {n}.", "n", n)
    return n


def completion_request(body: dict, max_model_len: int) -> tuple[list[list[int]], int | None, int]:
    """/v1/completions: (prompts' token ids, max_tokens, n), checked in vLLM's order."""
    limit = max_tokens(body, 16, False, max_model_len)
    n = num_choices(body)
    return prompt_ids(body.get("prompt"), "prompt", max_model_len), limit, n


def chat_request(body: dict, max_model_len: int) -> tuple[list[list[int]], int | None, int]:
    """/v1/chat/completions: ([the rendered chat's token ids], max_tokens, n), checked in vLLM's order."""
    prompt = checked_length(tokens.encode(tokens.render_chat(chat_messages(body))), True, max_model_len)
    limit = max_tokens(body, None, True, max_model_len)
    return [prompt], limit, num_choices(body)
