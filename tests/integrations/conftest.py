"""The integration suite: shiftbn against the real timm, torchvision, MONAI, Lightning and Hugging Face.

It runs in its own environment (``make test-integrations`` builds ``.venv-integrations``); the plain
``make test`` run does not collect this folder (``--ignore`` in pyproject's addopts). Every model is
random-init (no weight downloads), every input tiny.
"""

import pytest
import torch

# One thread: the inputs are tiny (a 32x32 conv gains nothing from a second thread), and where the
# cores are shared OpenMP's spinning threads made every forward 4-6x slower than one thread.
torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integrations/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
