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


@pytest.fixture(autouse=True)
def _same_threads_for_every_test():
    """Every test starts with 2 torch threads: an in-process CLI call with ``--threads N`` sets torch's
    global count, and float32 kernels may block differently under another count (last-digit changes)."""
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _quiet_phase_lines():
    """Phase lines off in every test, as bars are (``TQDM_DISABLE``); a test of them turns them on."""
    from shiftbn import _log

    _log.set_quiet(True)
    yield
    _log.set_quiet(False)
