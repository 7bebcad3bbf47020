"""Lightning demo: an MLP classifier trained with the OnlineLLCCallback and a CSV logger.

A two-hidden-layer MLP learns a synthetic 4-class task (labels from a random teacher network,
built in; nothing is downloaded). ``OnlineLLCCallback`` logs ``llc/mean``, ``llc/lower``,
``llc/upper``, ``llc/status`` and the diagnostics through Lightning's ``CSVLogger``; after
training the logged CSV is read back and drawn as a band. Where the final band is wide because
the LLC was still rising (the co-moving chain trails a moving level, and the band counts the
lag), the demo says so and estimates the end point with ``estimate_llc`` at the live chain's
estimand and step (``monitor.chain_config.estimate_kwargs()``).

Run:  online-llc demo lightning --out out   (needs the lightning and demos extras)
Writes ``out/lightning_logs/version_*/metrics.csv`` and ``out/lightning_mlp.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from online_llc import estimate_llc
from online_llc.calibration.step import relaxation_steps
from online_llc.callbacks import OnlineLLCCallback
from online_llc.monitor.policy import LAG_FRACTION, lag_std


class Classifier(L.LightningModule):
    """An MLP with a ``per_sample_loss`` method: the callback needs no ``loss_fn`` then."""

    def __init__(self, width: int = 64, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_sample_loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.per_sample_loss(batch).mean()
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def synthetic_data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        y = teacher(x).argmax(-1)
    return TensorDataset(x, y)


def main(argv: List[str] | None = None, prog: str | None = None) -> int:
    """Run the demo; ``argv`` are its command-line options (``--help`` lists them)."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out", help="folder for the logs and the PNG (default: out)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    torch.set_num_threads(1)
    L.seed_everything(args.seed, verbose=False)

    data = synthetic_data(4096, seed=args.seed)
    loader = DataLoader(data, batch_size=64, shuffle=True)
    callback = OnlineLLCCallback(every_n_steps=5, window=20, prog_bar=True, seed=args.seed)
    logger = CSVLogger(args.out, name="lightning_logs")
    trainer = L.Trainer(
        max_epochs=args.epochs,
        callbacks=[callback],
        logger=logger,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=20,
    )
    trainer.fit(Classifier(), loader)

    csv_path = os.path.join(logger.log_dir, "metrics.csv")
    print(f"\nLogged {len(callback.monitor.history())} LLC windows to {csv_path}")
    monitor = callback.monitor
    final = monitor.estimate
    print(f"Final LLC {final.mean:.1f} (90% band {final.lower:.1f} .. {final.upper:.1f}), status {final.status}")
    # Why the band is as wide as it is: while the LLC still rises, the co-moving chain trails the
    # level by about half its relaxation time, and the band counts that lag (policy.lag_std).
    relax = relaxation_steps(monitor.chain_config)  # shadow steps
    lag = lag_std(final.slope, relax, monitor.every_n_steps)
    if final.std > 0 and lag > 0.5 * final.std:
        print(f"The band is wide because the LLC was still rising ({final.slope:+.3f} per step) and the chain trails "
              f"it by up to ~{LAG_FRACTION * relax * monitor.every_n_steps:.0f} training steps (half its relaxation time): that lag is "
              f"{lag:.1f} of the band's std {final.std:.1f}; the window means scatter by {final.raw_se:.1f}.")
        # The end point alone, at the live chain's estimand and step: a few seconds.
        with warnings.catch_warnings():  # its heat is the live chain's, printed below
            warnings.simplefilter("ignore", RuntimeWarning)
            res = estimate_llc(trainer.lightning_module, Classifier.per_sample_loss, loader, num_samples=len(data),
                               progress=False, **monitor.chain_config.estimate_kwargs())
        print(f"estimate_llc at the final weights (the same estimand and step): {res.mean:.1f} +- {res.std:.1f} "
              f"(heat {res.total_heat:.2f})")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from online_llc.plot import plot_llc, read_run

    history = read_run(csv_path)  # read back what the logger wrote, as any user of the CSV would
    fig, ax = plt.subplots(figsize=(9, 4.5))
    plot_llc(history, ax=ax, title="Live LLC of an MLP classifier (Lightning CSVLogger)")
    fig.tight_layout()
    png = os.path.join(args.out, "lightning_mlp.png")
    fig.savefig(png, dpi=110)
    print(f"Wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
