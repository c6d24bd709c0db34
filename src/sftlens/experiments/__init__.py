"""Causal experiments: logit/tuned lens probing, layer swapping, layer-wise interpolation."""
