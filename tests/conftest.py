import warnings

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _quiet_tqdm(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        yield
