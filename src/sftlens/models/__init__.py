"""Models: resolving and loading checkpoints, streaming their tensors, and the one
architecture layer (:mod:`sftlens.models.surgery`) that knows where each family keeps things."""
