import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def pytest_collection_modifyitems(config, items):
    """Skip, before any fixture runs, the tests marked ``cuda`` (``cuda(devices=N)``: N devices)
    that this machine cannot run, with one line saying what they need."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        marker = item.get_closest_marker("cuda")
        needed = marker.kwargs.get("devices", 1) if marker else 0
        if needed > available:
            reason = "needs CUDA" if needed == 1 else f"needs {needed} CUDA devices (has {available})"
            item.add_marker(pytest.mark.skip(reason=f"{reason}: run scripts/gpu_check.sh on a GPU machine"))
