"""Fixtures for the lens and probe tests (model builders in ``lens_models.py``)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from lens_models import ARCH_CONFIGS


@pytest.fixture(scope="session")
def arch_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        name: tf.AutoModelForCausalLM.from_config(config()).eval()
        for name, config in ARCH_CONFIGS.items()
    }
