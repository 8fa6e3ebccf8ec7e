"""The integration suite: shiftbn against the real timm, torchvision, MONAI, Lightning and Hugging Face.

It runs in its own environment (``make test-integrations`` builds ``.venv-integrations``); the plain
``make test`` run does not collect this folder (``--ignore`` in pyproject's addopts). Every model is
random-init (no weight downloads), every input tiny.
"""

import pytest
import torch


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integrations/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
