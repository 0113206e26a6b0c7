"""Serve profiles: per model, the quantization levels that exist and their exact vLLM flags.

The profiles are `deploy/profiles/<card>.yaml` (users edit them), looked up as kvlab.resources says:
`KVLAB_PROFILES`, else ./deploy/profiles, else the package's; `_default.yaml` covers models without a card.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvlab import resources
from kvlab.errors import KvlabError
from kvlab.io import read_mapping
from kvlab.models.cards import format_validation  # cards' wording for field errors
from kvlab.serve_config import ServeConfig, parse_serve_config

DEFAULT_MODEL = "_default"
_NAME = re.compile(r"^[a-z0-9][a-z0-9+._-]*$")


class ServeProfile(BaseModel):
    """One quantization level of one model."""

    model_config = ConfigDict(extra="forbid")
    name: str = ""
    description: str
    args: list[str] = Field(default_factory=list)  # passed to `vllm serve` as they are
    checkpoint: str | None = None  # a pre-quantized checkpoint served instead of the card's model
    weights: str | None = None  # kvlab weight format when no --quantization flag names it
    note: str | None = None

    @field_validator("args")
    @classmethod
    def _no_model_or_port(cls, args: list[str]) -> list[str]:
        for a in args:
            if a.split("=")[0] in ("--model", "--port", "--host", "--api-key"):
                raise ValueError(f"{a.split('=')[0]} is set by kvlab serve, not by a profile")
        return args

    def serve_config(self, model: str, extra_args: list[str] = ()) -> ServeConfig:
        """This level for MODEL, with the user's extra vLLM flags on top: parsed once, typed."""
        return parse_serve_config(model, [*self.args, *extra_args], level=self.name or None,
                                  checkpoint=self.checkpoint, weights=self.weights)


class ModelProfiles(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    profiles: dict[str, ServeProfile] = Field(min_length=1)

    @field_validator("profiles")
    @classmethod
    def _names(cls, profiles: dict[str, ServeProfile]) -> dict[str, ServeProfile]:
        for name, p in profiles.items():
            if not _NAME.match(name):
                raise ValueError(f"profile name {name!r}: use lower-case letters, digits and + . _ -")
            p.name = name
        return profiles


def _load_file(path: Path) -> ModelProfiles:
    data = read_mapping(path, "a model's serve profiles")
    try:
        mp = ModelProfiles.model_validate(data)
    except ValidationError as e:
        raise KvlabError(format_validation(e, str(path))) from None
    if mp.model != path.stem:
        raise KvlabError(f"{path}: field model: {mp.model!r} must match the file name {path.stem!r}")
    return mp


@cache
def _load_cached(path: Path, mtime_ns: int) -> ModelProfiles:
    return _load_file(path)


def model_profiles(card_name: str | None) -> ModelProfiles:
    """The profiles of a card (or of a model without a card when card_name is None)."""
    filename = f"{card_name or DEFAULT_MODEL}.yaml"
    missing = f"no serve profiles for {card_name or 'models without a card'} (add {filename}, like llama-3.1-8b.yaml)"
    path = resources.find(resources.PROFILES, filename, missing)
    return _load_cached(path, path.stat().st_mtime_ns)


def profile(card_name: str | None, quant: str) -> ServeProfile:
    """One profile; an unknown level lists those that exist for the model."""
    mp = model_profiles(card_name)
    if quant in mp.profiles:
        return mp.profiles[quant]
    who = card_name or "a model without a card"
    raise KvlabError(f"{who} has no quantization level {quant!r}; it has: {', '.join(mp.profiles)}")


def all_profiles() -> dict[str, ModelProfiles]:
    return {name: model_profiles(None if name == DEFAULT_MODEL else name)
            for name in resources.names(resources.PROFILES)}
