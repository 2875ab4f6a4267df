"""The training loop: a LightningModule around LocalizationNet's receiver-set network."""

from __future__ import annotations

import lightning as L
import torch

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
