"""Helpers of the integration suite: import a library or skip naming the command that installs it."""

import pytest

REASON = "needs {lib}: run `make test-integrations` (it builds .venv-integrations with timm, torchvision, monai, " \
         "lightning, datasets, nibabel)"


def need(lib: str):
    """``import lib`` or skip the test, saying how to run the integration suite."""
    return pytest.importorskip(lib, reason=REASON.format(lib=lib))
