"""The Lightning tutorial (docs/tutorials/lightning.md) runs as written with the real Lightning."""

from tests.integrations._lib import need
from tests.test_docs import ROOT, run_page

need("lightning")


def test_lightning_tutorial_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_page(ROOT / "docs" / "tutorials" / "lightning.md") > 0
