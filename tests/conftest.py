import os

# Triton kernels run on CPU only through the interpreter, which must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from helpers import tiny_llama

# Markers are declared on the tests themselves (pytestmark / decorators). The fast lane is
#   pytest -m "not slow and not distributed and not real_model and not interpreter"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def llama():
    return tiny_llama()
