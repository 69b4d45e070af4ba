"""Test-wide setup: CPU by default; Triton kernels run through the interpreter.

GPU tests carry the `gpu` marker and are skipped at collection when CUDA is absent.
"""

import os

# The interpreter must be chosen before triton decorates any kernel.
if not os.environ.get("KVLOFT_TEST_CUDA"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from interpreter_calls import skip_repatching_in_device_calls

if os.environ.get("TRITON_INTERPRET") == "1":
    skip_repatching_in_device_calls()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and os.environ.get("KVLOFT_TEST_CUDA"):
        return
    skip = pytest.mark.skip(reason="needs CUDA (run with KVLOFT_TEST_CUDA=1 on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
