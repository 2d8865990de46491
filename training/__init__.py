"""The training scripts and their helpers: data, distribution, plots."""
