"""Experiments: spec -> matrix of cells -> run records (manifest, results), resumable."""
