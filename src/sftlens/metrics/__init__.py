"""Pure metric functions (float64 reductions on torch tensors) and streaming accumulators.

One module per family: :mod:`.information` (matrix entropy, effective rank), :mod:`.geometry`
(CKA, cosine, mean shift), :mod:`.attention` (attention entropy, Jensen-Shannon),
:mod:`.routing` (mixture-of-experts routing shift and expert load) and
:mod:`.accumulators` (streaming versions that reuse those functions). Nothing here imports
models, transformers or the CLI.
"""

from __future__ import annotations

from sftlens.metrics.accumulators import (
    AttentionStats,
    PairMoments,
    PooledRows,
    PromptEntropy,
    RoutingStats,
    StreamingCKA,
)
from sftlens.metrics.attention import (
    attention_entropy,
    attention_entropy_sums,
    attention_js,
    attention_js_sums,
)
from sftlens.metrics.geometry import (
    cka_from_moments,
    linear_cka,
    mean_cosine_similarity,
    mean_shift,
    mean_shift_from_means,
    row_cosine,
    unbiased_cka,
)
from sftlens.metrics.information import (
    alpha_entropy_from_eigenvalues,
    alpha_entropy_rows,
    dataset_entropy,
    effective_rank,
    gram_eigenvalues,
    masked_gram_eigenvalues,
    matrix_entropy,
    normalize_entropy,
    normalize_rows,
    paper_dataset_eigenvalues,
)
from sftlens.metrics.routing import expert_counts, load_tv, route_js, routing_sums, token_js

__all__ = [
    "AttentionStats",
    "PairMoments",
    "PooledRows",
    "PromptEntropy",
    "RoutingStats",
    "StreamingCKA",
    "alpha_entropy_from_eigenvalues",
    "alpha_entropy_rows",
    "attention_entropy",
    "attention_entropy_sums",
    "attention_js",
    "attention_js_sums",
    "cka_from_moments",
    "dataset_entropy",
    "effective_rank",
    "expert_counts",
    "gram_eigenvalues",
    "linear_cka",
    "load_tv",
    "masked_gram_eigenvalues",
    "matrix_entropy",
    "mean_cosine_similarity",
    "mean_shift",
    "mean_shift_from_means",
    "normalize_entropy",
    "normalize_rows",
    "paper_dataset_eigenvalues",
    "route_js",
    "routing_sums",
    "row_cosine",
    "token_js",
    "unbiased_cka",
]
