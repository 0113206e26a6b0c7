"""Model cards and MODEL resolution.

MODEL is a built-in card name (`kvlab cards`), a local folder holding config.json (or the file
itself), or a Hugging Face id (read from the local Hugging Face cache; fetched from the hub only
when online and `huggingface_hub` is installed).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvlab.errors import KvlabError
from kvlab.io import read_mapping
from kvlab.models.arch import ModelArch, arch_from_config

QuantName = Literal["fp8", "awq", "gptq", "gptq-int8", "int8"]


class Checkpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hf_id: str
    note: str | None = None


class Card(BaseModel):
    """A built-in model: its Hugging Face id, the config fields that matter, quantized checkpoints."""

    model_config = ConfigDict(extra="forbid")
    name: str
    hf_id: str
    family: str
    published_params: dict[Literal["total", "active"], float]
    context_length: int = Field(gt=0)
    sources: list[str] = Field(min_length=1)
    config: dict[str, Any]
    quantized: dict[QuantName, Checkpoint] = {}
    notes: str | None = None

    @property
    def arch(self) -> ModelArch:
        return arch_from_config(self.config, f"card {self.name}")


def format_validation(err: ValidationError, where: str) -> str:
    """A pydantic error as one line naming the file and the field (cards, profiles, specs, workloads)."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    extra = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}: field {loc}: {msg}{extra}"


def load_card_file(path: Path | str, text: str | None = None) -> Card:
    where = str(path)
    data = read_mapping(Path(path), "a card", text=text)
    try:
        card = Card.model_validate(data)
    except ValidationError as e:
        raise KvlabError(format_validation(e, where)) from None
    card.arch  # validates the config fields too
    return card


@cache
def builtin_cards() -> dict[str, Card]:
    folder = resources.files("kvlab.models") / "cards"
    cards = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            card = load_card_file(f"cards/{entry.name}", entry.read_text())
            cards[card.name] = card
    return cards


def card(name: str) -> Card:
    cards = builtin_cards()
    if name in cards:
        return cards[name]
    raise KvlabError(unknown_model_message(name))


def unknown_model_message(name: str) -> str:
    cards = builtin_cards()
    close = difflib.get_close_matches(name.lower(), list(cards), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return (
        f"unknown model {name!r}: {hint}Give a card name (kvlab cards), a local folder with "
        "config.json, or a Hugging Face id (org/name)"
    )


@dataclass(frozen=True)
class ResolvedModel:
    """What MODEL named: the architecture, and where it came from."""

    name: str  # card name, folder name or HF id
    arch: ModelArch
    source: str  # "card", "local" or "hf-cache" / "hf-hub"
    hf_id: str | None = None
    path: Path | None = None  # local folder (or HF cache snapshot) with the checkpoint
    card: Card | None = None
    config: dict[str, Any] | None = field(default=None, compare=False, repr=False)  # the config.json read
    overridden: bool = False  # its config under --hf-overrides (`with_hf_overrides`)

    @property
    def default_max_model_len(self) -> int | None:
        """The context length kvlab takes without --max-model-len: the card's, unless --hf-overrides changed
        the config (then vLLM's own default, the length derived from the overridden config: None here)."""
        return self.card.context_length if self.card is not None and not self.overridden else None


def _is_sub_config(value: Any) -> bool:
    """A nested config in a config.json (text_config, vision_config, ...: transformers writes each
    with its own model_type), which vLLM's --hf-overrides merges into rather than replaces."""
    return isinstance(value, dict) and "model_type" in value


def _update_nested(target: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    out = dict(target)
    for key, value in updates.items():
        old = out.get(key)
        out[key] = _update_nested(old, value) if isinstance(value, dict) and isinstance(old, dict) else value
    return out


def apply_hf_overrides(cfg: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A config.json's fields under vLLM's --hf-overrides (vllm/config/model.py, ModelConfig: a flat
    value is set; a dict value is merged, recursively, into a nested config and set whole otherwise:
    rope_scaling, quantization_config)."""
    out = dict(cfg)
    for key, value in overrides.items():
        old = out.get(key)
        out[key] = _update_nested(old, value) if isinstance(value, dict) and _is_sub_config(old) else value
    return out


def with_hf_overrides(resolved: ResolvedModel, overrides: str | dict[str, Any] | None) -> ResolvedModel:
    """`resolved` with vLLM's --hf-overrides (a JSON object, as the flag takes it) applied to the
    config.json it was read from: the architecture vLLM builds from the overridden config."""
    if not overrides:
        return resolved
    values = json.loads(overrides) if isinstance(overrides, str) else overrides
    if resolved.config is None:  # (every resolve_model result keeps the config it read)
        raise KvlabError(f"{resolved.name}: its config.json is not at hand for --hf-overrides")
    cfg = apply_hf_overrides(resolved.config, values)
    return dataclasses.replace(resolved, arch=arch_from_config(cfg, f"{resolved.name} with --hf-overrides"), config=cfg,
                               overridden=True)


def _read_config(path: Path, label: str) -> dict[str, Any]:
    return read_mapping(path, "config.json", where=f"{label}: {path.name}" if label != str(path) else None)


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def cached_snapshot(hf_id: str) -> Path | None:
    """The local HF cache snapshot of a repo that holds config.json (refs/main first)."""
    repo = hf_cache_dir() / ("models--" + hf_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = snapshots / ref.read_text().strip()
        if (snap / "config.json").is_file():
            return snap
    for snap in sorted(snapshots.iterdir()):
        if (snap / "config.json").is_file():
            return snap
    return None


def _looks_like_hf_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _from_hub(hf_id: str) -> dict[str, Any]:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "") not in ("", "0")
    advice = (f"download it where the hub is reachable (huggingface-cli download {hf_id} config.json) "
              "or pass a local folder / config.json, or a card name (kvlab cards)")
    if offline:
        raise KvlabError(f"{hf_id} is not in the local Hugging Face cache ({hf_cache_dir()}) and HF_HUB_OFFLINE is set: {advice}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise KvlabError(f"{hf_id} is not in the local Hugging Face cache ({hf_cache_dir()}) and huggingface_hub is not installed: {advice}") from None
    try:
        path = hf_hub_download(hf_id, "config.json", token=os.environ.get("HF_TOKEN"))
    except Exception as e:  # network errors, gated repos, missing repos: all end the same way for the user
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise KvlabError(f"cannot fetch {hf_id} from the Hugging Face hub ({reason}): {advice}") from None
    return _read_config(Path(path), hf_id)


def resolve_model(spec: str) -> ResolvedModel:
    """Resolve MODEL: card name, local folder or config.json, or Hugging Face id."""
    spec = spec.strip()
    if not spec:
        raise KvlabError("MODEL is empty: give a card name (kvlab cards), a local folder or a Hugging Face id")
    cards = builtin_cards()
    if spec in cards or spec.lower() in cards:
        c = cards[spec if spec in cards else spec.lower()]
        return ResolvedModel(c.name, c.arch, "card", hf_id=c.hf_id, card=c, config=c.config)
    path = Path(spec).expanduser()
    if path.exists():
        cfg_path = path / "config.json" if path.is_dir() else path
        if not cfg_path.is_file():
            raise KvlabError(f"{spec}: no config.json in this folder")
        label = str(path)
        cfg = _read_config(cfg_path, label)
        folder = cfg_path.parent
        return ResolvedModel(folder.name if path.is_dir() else cfg_path.stem, arch_from_config(cfg, label), "local",
                             path=folder, config=cfg)
    if _looks_like_hf_id(spec):
        for c in cards.values():
            if c.hf_id.lower() == spec.lower():
                return ResolvedModel(c.name, c.arch, "card", hf_id=c.hf_id, card=c, config=c.config)
        snap = cached_snapshot(spec)
        if snap is not None:
            cfg = _read_config(snap / "config.json", spec)
            return ResolvedModel(spec, arch_from_config(cfg, spec), "hf-cache", hf_id=spec, path=snap, config=cfg)
        cfg = _from_hub(spec)
        return ResolvedModel(spec, arch_from_config(cfg, spec), "hf-hub", hf_id=spec, config=cfg)
    raise KvlabError(unknown_model_message(spec))
