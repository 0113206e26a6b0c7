"""Comparison tables, plots and the HTML/Markdown report, rebuilt from run records alone."""
