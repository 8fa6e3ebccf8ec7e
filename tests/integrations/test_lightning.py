"""Lightning: statistics of a LightningModule, ``PreciseBNCallback`` in a real ``Trainer.fit``, and the
checkpoint it writes read by the CLI."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import shiftbn as sb
from shiftbn.cli import main
from tests.integrations._lib import need

L = need("lightning")


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                   nn.Flatten(), nn.Linear(4, 2))

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, _):
        x, y, _ = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, _):
        x, y, _ = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make():
    """The plain network of ``Net`` (the CLI's factory for the Lightning checkpoint)."""
    return Net().model


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 8, 8, generator=g)
    x[16:] = x[16:] * 2 + 1
    y = torch.arange(32) % 2
    return sb.SourceTaggedDataset(TensorDataset(x, y), ["lab_a"] * 16 + ["lab_b"] * 16)


def _trainer(tmp_path, callbacks):
    return L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=L.pytorch.loggers.CSVLogger(tmp_path),
                     callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, num_sanity_val_steps=1)


def test_statistics_of_a_lightning_module_are_those_of_its_network():
    net, ds = Net().eval(), _data()
    a = sb.collect_stats(net, ds, batch_size=8, progress=False)
    b = sb.collect_stats(net.model, ds, batch_size=8, progress=False)
    np.testing.assert_array_equal(a["lab_b"].layers["model.1"].mean, b["lab_b"].layers["1"].mean)


def test_callback_writes_precise_bn_and_logs_drift_per_source(tmp_path):
    from shiftbn.integrations.lightning import PreciseBNCallback

    ds = _data()
    net = Net()
    callback = PreciseBNCallback(num_samples=None)
    trainer = _trainer(tmp_path, [callback])
    trainer.fit(net, DataLoader(ds, batch_size=8, shuffle=True), DataLoader(ds, batch_size=8))
    assert {"bn_drift/lab_a", "bn_drift/lab_b"} <= set(trainer.callback_metrics)
    assert float(trainer.callback_metrics["bn_drift/lab_b"]) == pytest.approx(
        callback.last.summary().set_index("source").loc["lab_b", "mean"], rel=1e-6)
    # the buffers hold PreciseBN statistics of the final weights: recomputing them changes nothing
    again = sb.collect_stats(net, ds, by_source=False, batch_size=8, progress=False).pooled()
    np.testing.assert_allclose(net.model[1].running_mean.double().numpy(), again.layers["model.1"].mean,
                               rtol=0, atol=1e-6)
    assert net.training is False or net.training is True  # modes restored by Lightning's own loop
    assert callback.last is not None and not callback.last.drift.empty


def test_callback_leaves_training_untouched_apart_from_bn_buffers(tmp_path):
    from shiftbn.integrations.lightning import PreciseBNCallback

    ds = _data()
    runs = []
    for callbacks in ([], [PreciseBNCallback(num_samples=16)]):
        L.seed_everything(0)
        net = Net()
        _trainer(tmp_path / str(len(runs)), callbacks).fit(
            net, DataLoader(ds, batch_size=8, shuffle=True), DataLoader(ds, batch_size=8))
        runs.append({k: v.clone() for k, v in net.state_dict().items()})
    # train-mode BN never reads the running statistics, and the callback keeps torch's random state:
    # every weight is the same with and without it; only the BN buffers differ
    differ = {k for k in runs[0] if not torch.equal(runs[0][k], runs[1][k])}
    assert differ <= {"model.1.running_mean", "model.1.running_var"}, differ


def test_lightning_checkpoint_through_the_cli(tmp_path, monkeypatch):
    ds = _data()
    net = Net()
    trainer = _trainer(tmp_path, [])
    trainer.fit(net, DataLoader(ds, batch_size=8, shuffle=True))
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt, weights_only=True)
    from PIL import Image

    for site, offset in (("lab_a", 60), ("lab_b", 160)):
        for cls in ("neg", "pos"):
            (tmp_path / "data" / site / cls).mkdir(parents=True)
            for i in range(3):
                arr = np.clip(np.random.default_rng(i).normal(offset, 20, size=(8, 8)), 0, 255).astype(np.uint8)
                Image.fromarray(arr, mode="L").save(tmp_path / "data" / site / cls / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    code = main(["stats", "--model", "tests.integrations.test_lightning:make", "--weights", str(ckpt),
                 "--state-key", "state_dict", "--strip-prefix", "model.", "--data", "data", "--batch-size", "6",
                 "--no-progress", "--out", "st"])
    assert code == 0 and (tmp_path / "st" / "stats.json").is_file()
