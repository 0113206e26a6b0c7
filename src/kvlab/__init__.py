"""kvlab: a serving-experiment testbed on vLLM.

How much GPU memory do Multi-head Latent Attention (MLA), KV-cache quantization and weight
quantization save, and what does that buy in agent throughput and cost per token?
"""

__version__ = "0.1.0"
