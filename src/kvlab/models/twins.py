"""Tiny geometry twins: random-weight checkpoints that keep a real model's KV geometry.

A twin has the real model's architecture class, number of layers and per-layer KV geometry
(MLA: the 512 + 64 latent; GQA/MHA: the real KV heads x head_dim, with as few query heads as keep
the attention type), with a small hidden size, MLP, experts and vocabulary. vLLM sizes its KV cache from exactly those fields,
so the memory side of an experiment on a twin is a real measurement without a GPU. A small
byte-level BPE tokenizer with a chat template is trained offline, so /v1/chat/completions streams.

Twins are built deterministically (fixed seed) into a cache folder and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from kvlab import __version__
from kvlab.errors import KvlabError
from kvlab.models.arch import HEAD_DIM_FROM_HIDDEN, arch_from_config
from kvlab.models.cards import Card
from kvlab.schema import RecordError
from kvlab.schema.twin import TwinMarker

TWIN_HIDDEN = 256
TWIN_INTERMEDIATE = 512
TWIN_MOE_INTERMEDIATE = 64
TWIN_EXPERTS = 4
TWIN_EXPERTS_PER_TOK = 2
TWIN_VOCAB = 1000
SEED = 0
FORMAT_VERSION = 3  # bump when the twin recipe changes, so cached twins are rebuilt
MARKER = "kvlab_twin.json"  # written last: kvlab.schema.twin.TwinMarker

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '</s>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Fields copied from the real config as they are: they decide the architecture and KV geometry.
_KEEP = (
    "architectures", "model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "q_lora_rank",
    "first_k_dense_replace", "moe_layer_freq", "decoder_sparse_step", "mlp_only_layers",
    "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window", "max_window_layers",
    "layer_types", "tie_word_embeddings",
)


def twin_config(card: Card) -> dict[str, Any]:
    """The twin's config.json: the real KV geometry, small everything else."""
    real = card.config
    arch = card.arch
    cfg: dict[str, Any] = {k: real[k] for k in _KEEP if k in real}
    cfg.update(
        hidden_size=TWIN_HIDDEN,
        intermediate_size=TWIN_INTERMEDIATE,
        vocab_size=TWIN_VOCAB,
        max_position_embeddings=card.context_length,
        torch_dtype="bfloat16",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=3,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
    )
    if arch.mla is None:
        # Query heads are not cached: keep the fewest that keep the attention type (2 per KV head
        # for GQA), which keeps the twin fast on a CPU.
        heads = arch.num_key_value_heads * (1 if arch.attention == "MHA" else 2)
        cfg["num_attention_heads"] = heads
        if arch.model_type in HEAD_DIM_FROM_HIDDEN:
            # vLLM derives head_dim = hidden / heads for these: keep the real head size that way.
            cfg["hidden_size"] = heads * arch.head_dim
            cfg.pop("head_dim", None)
        else:
            # Keep head_dim explicit: hidden/heads of the twin is not the real head size.
            cfg["head_dim"] = arch.head_dim
    else:
        # Queries are small (they are not cached); the cached latent keeps its real width.
        cfg.update(qk_nope_head_dim=16, v_head_dim=16, q_lora_rank=None, n_group=1, topk_group=1,
                   topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                   routed_scaling_factor=1.0)
    if arch.moe is not None:
        cfg.update(moe_intermediate_size=TWIN_MOE_INTERMEDIATE, num_experts_per_tok=TWIN_EXPERTS_PER_TOK)
        if arch.mla is not None:
            cfg.update(n_routed_experts=TWIN_EXPERTS, n_shared_experts=min(1, arch.moe.num_shared_experts))
        else:
            cfg.update(num_experts=TWIN_EXPERTS)
            if arch.moe.shared_expert_intermediate_size:
                cfg["shared_expert_intermediate_size"] = TWIN_INTERMEDIATE
            if "norm_topk_prob" in real:
                cfg["norm_topk_prob"] = real["norm_topk_prob"]
    # The twin must have the same KV geometry as the card, whatever the recipe above did.
    twin = arch_from_config(cfg, f"twin of {card.name}")
    if (twin.num_layers, twin.attention) != (arch.num_layers, arch.attention) or (
        twin.mla.latent_dim if twin.mla else (twin.num_key_value_heads, twin.head_dim)
    ) != (arch.mla.latent_dim if arch.mla else (arch.num_key_value_heads, arch.head_dim)):
        raise AssertionError(f"twin of {card.name} lost the KV geometry")
    return cfg


def twins_dir() -> Path:
    base = os.environ.get("KVLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvlab")
    return Path(base) / "twins"


def _recipe_hash(cfg: dict[str, Any]) -> str:
    blob = json.dumps({"cfg": cfg, "format": FORMAT_VERSION, "seed": SEED}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _training_text() -> list[str]:
    """A deterministic corpus for the twin's tokenizer: agent-like chat, JSON and code words."""
    words = (
        "the a an of to in and or for with on at by from as is are was be this that it you we they "
        "tool call function result error ok true false null id name type value items list search "
        "read write file path query user assistant system task step plan done next retry status "
        "json string number object array required properties description parameters arguments "
        "def return import class self if else elif while for in not None True False print "
        "request response token cache memory block layer model server agent session turn time"
    ).split()
    lines = []
    for i in range(3000):
        w = [words[(i * 7 + j * 13) % len(words)] for j in range(12)]
        lines.append(" ".join(w) + f' {{"id": {i}, "value": "{w[0]}_{i % 97}"}} {i * 31 % 1000}.')
    lines += ["".join(chr(c) for c in range(32, 127))] * 10
    return lines


def build_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=TWIN_VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_text(), trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": False,
        "model_max_length": 1 << 20,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, indent=2))


def read_marker(folder: Path) -> TwinMarker:
    """The marker of a built twin (one line naming the file where it is missing or of another layout)."""
    return TwinMarker.read(Path(folder) / MARKER)


def _is_built(marker: Path, digest: str) -> bool:
    """A complete twin of this recipe; a missing, torn or other-layout marker is built again."""
    try:
        built = TwinMarker.read_optional(marker)
    except RecordError:
        return False
    return built is not None and built.recipe == digest


def build_twin(card: Card, out: Path | None = None, force: bool = False,
               on_step: Callable[[str], None] | None = None) -> Path:
    """Build (or reuse) the twin of a card; returns its folder. on_step: called with each step's
    name (importing torch, building, writing, the tokenizer), for progress."""
    step = on_step or (lambda what: None)
    cfg = twin_config(card)
    digest = _recipe_hash(cfg)
    folder = Path(out) if out else twins_dir() / card.name
    marker = folder / MARKER
    if not force and _is_built(marker, digest):
        return folder
    step("importing torch and transformers")
    try:
        import torch
        import transformers
    except ImportError as e:
        raise KvlabError(f"building a twin needs torch and transformers ({e.name} is missing): "
                         "pip install 'kvlab[cpu]' or run make setup") from None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{card.name}-", dir=folder.parent))
    except OSError as e:
        raise KvlabError(f"cannot write the twin under {folder.parent}: {e.strerror}") from None
    try:
        hf_cfg = {k: v for k, v in cfg.items() if k != "architectures"}
        config = transformers.AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
        config.architectures = cfg["architectures"]
        transformers.logging.disable_progress_bar()  # no "Writing model shards" bars in a run's output
        torch.manual_seed(SEED)
        step(f"building the random-weight model ({config.num_hidden_layers} layers)")
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        step("writing the weights")
        model.save_pretrained(tmp)
        # Keep the config exactly as written above (save_pretrained adds transformers' defaults).
        saved = json.loads((tmp / "config.json").read_text())
        saved.update(cfg)
        (tmp / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True))
        step("training the chat tokenizer")
        build_tokenizer(tmp)
        params = sum(p.numel() for p in model.parameters())
        TwinMarker(twin_of=card.name, hf_id=card.hf_id, recipe=digest, kvlab_version=__version__, seed=SEED,
                   params=params).write(tmp / MARKER)
        if not force and _is_built(marker, digest):  # built meanwhile by another process: keep that one
            return folder
        if folder.exists():
            shutil.rmtree(folder)
        try:
            tmp.rename(folder)
        except OSError:
            if not _is_built(marker, digest):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
