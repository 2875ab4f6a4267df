"""The training loop: a LightningModule around LocalizationNet's receiver-set network."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from heimdall.atomic import save_figure, write_csv
from heimdall.data import FeatureSet
from heimdall.model import LocalizationNet, gaussian_nll


class LocalizationModule(L.LightningModule):
    """Trains the network part of LocalizationNet with the 2-D Gaussian NLL (positions in the
    model's isotropically normalised frame). Two physically exact augmentations:

    * TX power shift: adding the same ΔP to every receiver's RSS/SNR/log-mel of a session does not
      move the transmitter (its power is unknown anyway) — teaches invariance to power;
    * receiver dropout: randomly marks present receivers absent — teaches any subset to work.
    """

    def __init__(self, model: LocalizationNet, lr: float, weight_decay: float, max_epochs: int,
                 augment_power_db: float, augment_drop_receiver: float):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.max_epochs = lr, weight_decay, max_epochs
        self.augment_power_db = augment_power_db
        self.augment_drop_receiver = augment_drop_receiver
        self.history: list[dict] = []  # per-epoch train/val loss, for plots and train.json
        self._train_losses: list[float] = []
        self._val: list[tuple[float, torch.Tensor]] = []

    def _loss(self, batch, augment: bool):
        logmel, rss, snr, present, has_iq, rid, target = batch
        if augment:
            b = rss.shape[0]
            if self.augment_power_db > 0:
                shift = (torch.rand(b, 1, device=rss.device) * 2 - 1) * self.augment_power_db
                rss = rss + shift * present
                snr = snr + shift * present
                if logmel.dim() == 4 and logmel.shape[-1] > 1:
                    logmel = logmel + shift[..., None, None] * has_iq[..., None, None]
            if self.augment_drop_receiver > 0:
                keep = (torch.rand_like(present) >= self.augment_drop_receiver).float()
                # never drop below two receivers: a single reading says almost nothing
                keep = torch.where((present * keep).sum(1, keepdim=True) >= 2, keep, torch.ones_like(keep))
                present = present * keep
                has_iq = has_iq * present
        mean, chol = self.model.network(logmel, rss, snr, present, has_iq, rid)
        target_n = (target - self.model.pos_mean) / self.model.pos_scale
        nll = gaussian_nll(mean, chol, target_n)
        err_m = (mean - target_n).norm(dim=-1) * self.model.pos_scale
        return nll.mean(), err_m

    def training_step(self, batch, batch_idx):
        loss, _ = self._loss(batch, augment=True)
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=batch[0].shape[0])
        self._train_losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch, batch_idx):
        loss, err = self._loss(batch, augment=False)
        n = batch[0].shape[0]
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, batch_size=n)
        self._val.append((float(loss) * n, err.detach()))

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking or not self._val:
            self._val.clear()
            return
        n = sum(len(e) for _, e in self._val)
        val_loss = sum(l for l, _ in self._val) / n
        median = float(torch.cat([e for _, e in self._val]).median())
        self.log("val_median_error_m", median, prog_bar=True)
        train_loss = sum(self._train_losses) / max(len(self._train_losses), 1)
        self.history.append({"epoch": self.current_epoch, "train_loss": train_loss, "val_loss": val_loss,
                             "val_median_error_m": median})
        self._val.clear()
        self._train_losses.clear()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(self.max_epochs, 1), eta_min=self.lr * 0.05)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class SessionBatches(Dataset):
    """The model inputs and target of sessions ``idx`` (positions 0..len-1), fetched a whole batch at once:
    the DataLoader hands ``__getitems__`` the batch's positions (torch >= 2.1), and the log-mel rows are read
    from features.h5 in one call (FeatureSet.logmel, an H5Rows). The batches are those TensorDataset + the
    default collate made from the same positions, bit for bit (tests/test_train.py). ``include_logmel=False``
    (an RSS-only model): a (B, 1, 1, 1) zero placeholder, nothing read from the file."""

    def __init__(self, features: FeatureSet, idx: np.ndarray, include_logmel: bool):
        self.features, self.idx, self.include_logmel = features, np.asarray(idx), include_logmel

    def __len__(self) -> int:
        return len(self.idx)

    def __getitems__(self, positions: list[int]) -> list[torch.Tensor]:
        rows = self.idx[np.asarray(positions, dtype=np.int64)]
        inputs = self.features.model_inputs(rows, logmel=self.include_logmel)
        return [*inputs, torch.from_numpy(self.features.target_enu_m[rows].astype(np.float32))]

    def __getitem__(self, position: int) -> list[torch.Tensor]:
        return [t[0] for t in self.__getitems__([position])]


def _batch(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    """collate_fn: SessionBatches.__getitems__ already returns the batch (module level: picklable)."""
    return batch


class LocalizationDataModule(L.LightningDataModule):
    def __init__(self, features: FeatureSet, batch_size: int, include_logmel: bool, seed: int):
        super().__init__()
        self.features = features
        n_train = len(features.indices("train"))
        # A batch larger than the training split would make one ragged epoch: clamp it.
        self.batch_size = min(batch_size, n_train)
        self.include_logmel = include_logmel
        self.seed = seed
        self.train_set = SessionBatches(features, features.indices("train"), include_logmel)
        self.val_set = SessionBatches(features, features.indices("val"), include_logmel)

    def train_dataloader(self):
        # the sampler and its generator as with the TensorDataset this replaced: the same batches in the same order
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=g, drop_last=False,
                          collate_fn=_batch)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 256), shuffle=False, collate_fn=_batch)


def write_learning_curve(plots_dir: Path, history: list[dict]) -> list[Path]:
    """learning_curve.csv for `dvc plots` and learning_curves.png (the train stage's plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    write_csv(plots_dir / "learning_curve.csv",
               [{"epoch": h["epoch"], "train_loss": h["train_loss"], "val_loss": h["val_loss"]} for h in history])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([h["epoch"] for h in history], [h["train_loss"] for h in history], label="train (augmented)")
    ax.plot([h["epoch"] for h in history], [h["val_loss"] for h in history], label="val")
    ax.set(xlabel="epoch", ylabel="Gaussian NLL (network, normalised units)", title="Learning curves")
    ax.legend()
    return [plots_dir / "learning_curve.csv", save_figure(fig, plots_dir / "learning_curves.png")]
