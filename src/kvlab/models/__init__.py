"""Architecture from a Hugging Face config, model cards, parameter counts and the memory model."""
