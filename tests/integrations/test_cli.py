"""``--model timm:NAME`` / ``torchvision:NAME`` / ``monai:NAME`` with ``--model-kwargs``, end to end."""

import numpy as np
import pytest
import torch
from PIL import Image

from shiftbn.cli import main
from shiftbn.integrations import model_factory
from tests.integrations._lib import need


@pytest.fixture()
def folder(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for site, offset in (("site_a", 60), ("site_b", 160)):
        for cls in ("neg", "pos"):
            (tmp_path / "data" / site / cls).mkdir(parents=True)
            for i in range(2):
                arr = np.clip(rng.normal(offset, 20, size=(32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr, mode="RGB").save(tmp_path / "data" / site / cls / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("spec", "kwargs", "lib"), [
    ("timm:resnet18", ["num_classes=2"], "timm"),
    ("torchvision:resnet18", ["num_classes=2"], "torchvision"),
    ("monai:DenseNet121", ["spatial_dims=2,in_channels=3,out_channels=2"], "monai"),
])
def test_library_models_by_name(folder, spec, kwargs, lib):
    need(lib)
    from shiftbn.integrations import parse_model_kwargs

    model = model_factory(spec)(**parse_model_kwargs(kwargs))
    torch.save(model.state_dict(), folder / "w.pt")
    common = ["--model", spec, "--model-kwargs", *kwargs, "--weights", "w.pt", "--data", "data", "--batch-size", "4",
              "--no-progress"]
    assert main(["stats", *common, "--out", "st"]) == 0 and (folder / "st" / "stats.json").is_file()
    if lib == "torchvision":  # the matrix once (its cost grows with the model; the model path is the same)
        assert main(["matrix", *common, "--strategies", "ema", "target", "--out", "mx"]) == 0
        assert (folder / "mx" / "matrix.csv").is_file()


@pytest.mark.parametrize(("spec", "match"), [
    ("timm:resnet50x", "--model timm:resnet50x: timm has no model 'resnet50x'; did you mean"),
    ("torchvision:resnet19", "torchvision has no model 'resnet19'; did you mean torchvision:resnet18"),
    ("monai:DenseNet122", "monai has no network in monai.networks.nets 'DenseNet122'; did you mean"),
])
def test_unknown_model_names_are_one_line_naming_the_flag(folder, capsys, spec, match):
    need(spec.split(":")[0])
    code = main(["stats", "--model", spec, "--weights", "w.pt", "--data", "data", "--no-progress", "--out", "o"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert match in err
