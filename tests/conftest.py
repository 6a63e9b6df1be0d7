import os

# Triton kernels run on CPU only through the interpreter, which must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from helpers import tiny_llama

# Markers by file (and a few slow tests by name), in one place: the fast lane is
#   pytest -m "not slow and not distributed and not real_model and not interpreter"
_BY_FILE = {"test_distributed.py": "distributed", "test_smollm2.py": "real_model",
            "test_triton_kernel.py": "interpreter", "test_triton_compile.py": "interpreter"}
_SLOW = ("test_env_command_runs_as_module", "test_torch_compile_traces_the_fused_layer",
         "test_parity_with_peft_against_float64", "test_ipm_end_to_end_against_float64_forward",
         "test_init_corda_plus_writes_table_and_plot", "test_init[", "test_train_step[", "test_decompose[",
         "test_disk_offloaded_model_matches_the_in_memory_call", "test_peak_host_memory_stays_below_the_model",
         "test_generated_trl_script_runs", "test_peft_dropin[", "test_trl_sft", "test_trainer_configs")


def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = _BY_FILE.get(item.path.name)
        if marker:
            item.add_marker(marker)
        if "triton" in item.name and item.path.name == "test_fused.py":
            item.add_marker("interpreter")
        if item.name.startswith(_SLOW) or any(s in item.name for s in _SLOW if s.endswith("[")):
            item.add_marker("slow")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def llama():
    return tiny_llama()
