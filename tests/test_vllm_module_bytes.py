"""kvlab's weights against what vLLM itself holds once it has loaded a model: the geometry twins on
the installed CPU build of vLLM 0.32 (`tests/vllm_module_bytes.py`), every distinct tensor storage of
the loaded module counted. They equal kvlab's weight bytes (vocabulary rows padded to 64, as vLLM
allocates them) plus its rope cache, plus four fp32 scale scalars per attention layer
(_k_scale, _v_scale, _q_scale, _prob_scale: on a GPU 512 B each, the allocator's smallest block; not
modelled). The twins are random-weight models with the real layers: the same code sizes the real ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvlab.models.arch import arch_from_config
from kvlab.models.cards import card
from kvlab.models.twins import build_twin
from kvlab.models.weights import rope_cache_bytes, weight_bytes, weight_format

pytestmark = pytest.mark.slow  # a vLLM engine start per twin: ~20 s each on 2 cores

SCRIPT = Path(__file__).parent / "vllm_module_bytes.py"


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen2.5-7b", "deepseek-v2-lite"])
def test_the_loaded_module_holds_kvlabs_weights_and_rope_cache(name):
    pytest.importorskip("vllm")
    folder = build_twin(card(name))
    out = subprocess.run([sys.executable, str(SCRIPT), str(folder)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    held = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    arch = arch_from_config(json.loads((folder / "config.json").read_text()), name)
    ropes = [b for b in held["buffers"] if b[0].endswith("cos_sin_cache")]
    assert len(ropes) == 1  # one cache for the model, shared by its layers
    assert ropes[0][1:] == ["bfloat16", [arch.rope_cache_positions, arch.rotary_width]]
    scalars = [b for b in held["buffers"] if not b[0].endswith("cos_sin_cache")]
    assert {tuple(b[1:2]) + (tuple(b[2]),) for b in scalars} == {("float32", ())}
    assert len(scalars) == 4 * arch.num_layers
    assert held["storage_bytes"] == (weight_bytes(arch, weight_format(None, arch), "bfloat16")
                                     + rope_cache_bytes(arch, "bfloat16") + 4 * len(scalars))
