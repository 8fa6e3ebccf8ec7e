"""``PreciseBNCallback``: PreciseBN before each validation, and the drift of the EMA, in Lightning.

Why: Lightning users validate with the EMA in BN's buffers; recomputing the population statistics
under the current weights (Wu & Johnson 2021) gives the validation numbers of the model the weights
define, and the logged drift per source shows how stale the EMA was. Needs ``lightning``
(``pip install lightning``); the plain-PyTorch twin is ``shiftbn.integrations.refresh_bn``.
"""

from __future__ import annotations

from typing import Any

from shiftbn.data.items import ItemKeys
from shiftbn.integrations.loops import BNRefresh, refresh_bn

try:
    from lightning.pytorch import Callback
except ImportError:  # the older package name
    try:
        from pytorch_lightning import Callback
    except ImportError:
        raise ImportError("shiftbn.integrations.lightning needs Lightning: pip install lightning") from None


class PreciseBNCallback(Callback):
    """Before each validation: log the per-source drift of the running BN statistics, then recompute them.

    Why: see the module docstring. ``num_samples``: samples for PreciseBN (in total) and for the drift
    (per source); ``data``: the data to use (a ``SourceTaggedDataset`` gives drift per source), default
    the trainer's train loader (its dataset, in batches of its batch size). ``batch_size``: default the
    loader's. ``keys``: field names of dict items (``ItemKeys``). ``drift``/``precise``: turn either part
    off. ``every_n_epochs``: run on epochs 0, n, 2n, ... only. ``prefix``: logged names are
    ``"<prefix>/<source>"`` (mean over BN layers of ``metric``), with ``on_epoch=True``.
    Writes only the BN buffers' running mean and variance; modes and torch's random state are restored.
    The sanity-check validation before training is skipped. ``last`` holds the latest ``BNRefresh``.
    Example:
        >>> trainer = lightning.Trainer(callbacks=[PreciseBNCallback(num_samples=2048)])
    """

    def __init__(self, num_samples: int | None = 4096, *, data: Any = None, batch_size: int | None = None,
                 keys: ItemKeys | None = None, drift: bool = True, precise: bool = True, every_n_epochs: int = 1,
                 metric: str = "w2", prefix: str = "bn_drift", seed: int = 0) -> None:
        super().__init__()
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
        if not isinstance(metric, str):
            raise TypeError(f"metric must be one metric name ('w2', 'kl' or 'smd'), got {metric!r}")
        if not (drift or precise):
            raise ValueError("drift=False and precise=False leave nothing to do; keep at least one")
        self.num_samples, self.data, self.batch_size, self.keys = num_samples, data, batch_size, keys
        self.drift, self.precise, self.every_n_epochs = drift, precise, every_n_epochs
        self.metric, self.prefix, self.seed = metric, prefix, seed
        self.last: BNRefresh | None = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        data = self.data if self.data is not None else trainer.train_dataloader
        if data is None:
            raise ValueError("PreciseBNCallback found no train loader on the trainer (validate() without fit?); "
                             "pass data=<the training data> to the callback")
        self.last = refresh_bn(pl_module, data, num_samples=self.num_samples, batch_size=self.batch_size,
                               keys=self.keys, precise=self.precise, drift=self.drift, metric=self.metric,
                               seed=self.seed + trainer.current_epoch, progress=False)
        for name, value in self.last.metrics(self.prefix).items():
            pl_module.log(name, value, on_step=False, on_epoch=True)
