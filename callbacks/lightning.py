"""PyTorch Lightning adapter: ``Trainer(callbacks=[OnlineLLCCallback(...)])``.

A thin adapter over :class:`online_llc.OnlineLLC`: hooks translate into ``monitor.update`` calls,
closed windows into logger calls, and the monitor's ``state_dict`` into the checkpoint.

Works with the ``lightning`` package (``lightning.pytorch``) and, because Lightning callbacks are
duck-typed, with a ``pytorch_lightning`` Trainer too: pass the same object to either.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Mapping, Optional, Union

import numpy as np
import torch

from online_llc.config import DEFAULT_EVERY_N_STEPS, DEFAULT_LOCALIZATION, DEFAULT_WINDOW
from online_llc.errors import MonitorError, check_positive_int, reject_unknown
from online_llc.estimator import STATUSES, LLCEstimate, OnlineLLC
from online_llc.sgld import LossFn

try:  # the `lightning` package first; `pytorch_lightning` is the same code under another name
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - exercised only without `lightning`
    try:
        from pytorch_lightning import Callback
    except ImportError as exc:  # pragma: no cover
        raise ImportError(
            "online_llc.callbacks.OnlineLLCCallback needs Lightning: pip install 'online-llc[lightning]'"
        ) from exc

__all__ = ["OnlineLLCCallback", "LOGGED_KEYS"]

#: The keys logged at every closed window, in this order. ``llc/status`` is the index of the
#: status in :data:`online_llc.STATUSES` (0 warming_up, 1 tracking, 2 transition,
#: 3 not_at_minimum, 4 diverged); diagnostics may be NaN where undefined (see LLCEstimate).
LOGGED_KEYS = (
    "llc/mean",
    "llc/std",
    "llc/lower",
    "llc/upper",
    "llc/status",
    "llc/var_channel",
    "llc/ratio",
    "llc/consistency",
)

# Strategies whose parameters are sharded or partitioned: the shadow pass through
# torch.func.functional_call would see shards, not the model.
_UNSUPPORTED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAStrategy", "XLAFSDPStrategy")


def _per_sample_method(module: Any, batch: Any) -> torch.Tensor:
    return module.per_sample_loss(batch)


class _Probe(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


class OnlineLLCCallback(Callback):
    """Track the local learning coefficient of the LightningModule while it trains.

    At every ``every_n_steps``-th optimizer step (from ``trainer.global_step``, so gradient
    accumulation gives one shadow step per optimizer step, never per micro-batch) it runs one
    shadow SGLD step on that step's batch, under the trainer's precision context. When a window
    closes it logs :data:`LOGGED_KEYS` through every logger of the trainer (rank 0, step =
    ``trainer.global_step``) and puts them in ``trainer.callback_metrics``, so another callback
    (e.g. ``EarlyStopping(monitor="llc/mean")``) can use them.

    Under DDP every rank runs its own chain(s) with its own seed on its own batch; each window's
    draws are all-gathered in one packed collective, so every rank holds the same filter state and
    ``R`` ranks give ``R * num_chains`` chains at no extra cost per rank.

    Args:
        loss_fn: ``loss_fn(pl_module, batch) -> Tensor[B]`` per-sample losses. ``None``: the
            module's ``per_sample_loss(batch)`` method (zero-config path), if it has one.
        num_samples: ``n``; ``None`` takes the length of the train dataloader's dataset.
        nbeta, localization, step_size, every_n_steps, window, num_chains, seed, warmup,
            confidence, process_noise, jump_threshold, max_offset_norm, sampler, friction, groups,
            group_budget: as in :class:`online_llc.OnlineLLC`. Groups are given as parameter-name
            patterns (or modules of the LightningModule); each logs ``llc/<group>/mean`` and
            ``llc/<group>/std`` when its window closes.
        prog_bar: also show ``llc`` in the progress bar.
        strict: re-raise a failure of the monitor instead of warning once and disabling it.

    Attributes:
        monitor: the :class:`online_llc.OnlineLLC` (created when training starts).
        failure: why the monitor was disabled, or ``None``.
    """

    def __init__(
        self,
        loss_fn: Optional[LossFn] = None,
        *,
        num_samples: Optional[int] = None,
        nbeta: Optional[float] = None,
        localization: float = DEFAULT_LOCALIZATION,
        step_size: Optional[float] = None,
        every_n_steps: int = DEFAULT_EVERY_N_STEPS,
        window: int = DEFAULT_WINDOW,
        num_chains: int = 1,
        seed: int = 0,
        warmup: Union[int, str, None] = None,
        confidence: float = 0.9,
        process_noise: float = 0.1,
        jump_threshold: float = 16.0,
        max_offset_norm: Optional[float] = None,
        sampler: str = "sgld",
        friction: float = 0.1,
        groups: Optional[Mapping[str, Any]] = None,
        group_budget: int = 1,
        prog_bar: bool = False,
        strict: bool = False,
        **kwargs: Any,
    ) -> None:
        reject_unknown("OnlineLLCCallback()", kwargs)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"Expected `loss_fn` to be callable as loss_fn(pl_module, batch), got {loss_fn!r}.")
        if num_samples is not None:
            check_positive_int("num_samples", num_samples)
        self.loss_fn = loss_fn
        self.num_samples = num_samples
        self.seed = seed
        self.prog_bar = bool(prog_bar)
        self.strict = bool(strict)
        self._kwargs: Dict[str, Any] = dict(
            nbeta=nbeta,
            localization=localization,
            step_size=step_size,
            every_n_steps=every_n_steps,
            window=window,
            num_chains=num_chains,
            seed=seed,
            warmup=warmup,
            confidence=confidence,
            process_noise=process_noise,
            jump_threshold=jump_threshold,
            max_offset_norm=max_offset_norm,
            sampler=sampler,
            friction=friction,
            group_budget=group_budget,
        )
        # Groups name the LightningModule's parameters: resolved against it at on_train_start.
        self.groups = dict(groups) if groups is not None else None
        # Validate every argument now, with the core's own checks and messages, by building a
        # throwaway monitor on a probe module (zeros: no draw from the global RNG).
        OnlineLLC(_Probe(), _per_sample_method, num_samples=num_samples or 2, **self._kwargs)
        self.monitor: Optional[OnlineLLC] = None
        self.failure: Optional[str] = None
        self._pending_state: Optional[Mapping[str, Any]] = None
        self._last_global_step: Optional[int] = None
        self._alarms_seen: set = set()  # health alarm kinds already warned about
        self._world_size = 1

    # ---- identity ------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        """Distinct for instances with different settings, so several can coexist: Lightning
        refuses two stateful callbacks with the same key. (The loss function is not part of it:
        renaming a function must not orphan a checkpoint's state.)"""
        return self._generate_state_key(
            every_n_steps=self._kwargs["every_n_steps"],
            window=self._kwargs["window"],
            seed=self.seed,
            nbeta=self._kwargs["nbeta"],
            localization=self._kwargs["localization"],
            step_size=self._kwargs["step_size"],
            num_chains=self._kwargs["num_chains"],
            warmup=self._kwargs["warmup"],
            num_samples=self.num_samples,
            confidence=self._kwargs["confidence"],
            process_noise=self._kwargs["process_noise"],
            jump_threshold=self._kwargs["jump_threshold"],
            max_offset_norm=self._kwargs["max_offset_norm"],
            sampler=self._kwargs["sampler"],
            friction=self._kwargs["friction"],
            groups=sorted(self.groups) if self.groups else None,
            group_budget=self._kwargs["group_budget"],
        )

    # ---- set-up ----------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        name = type(trainer.strategy).__name__
        if name in _UNSUPPORTED:
            raise ValueError(
                f"OnlineLLCCallback does not support the {name} strategy yet (sharded or partitioned "
                "parameters); use a single device or DDP."
            )
        if self.loss_fn is None and not callable(getattr(pl_module, "per_sample_loss", None)):
            raise ValueError(
                "Expected `loss_fn` to be given, or the LightningModule to define per_sample_loss(batch) "
                "returning per-sample losses of shape [B]; got neither."
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        num_samples = self.num_samples if self.num_samples is not None else self._dataset_length(trainer)
        self._world_size = int(getattr(trainer, "world_size", 1) or 1)
        rank = int(getattr(trainer, "global_rank", 0) or 0)
        kwargs = dict(self._kwargs)
        # Every rank its own chains: a rank-dependent seed (rank 0 keeps the user's seed).
        kwargs["seed"] = self.seed + 104729 * rank
        gather = self._gather(trainer) if self._world_size > 1 else None
        self.monitor = OnlineLLC(
            pl_module,
            self.loss_fn or _per_sample_method,
            num_samples=num_samples,
            gather=gather,
            groups=self.groups,
            **kwargs,
        )
        if self._pending_state is not None:
            self.monitor.load_state_dict(self._pending_state)
            if self._world_size > 1:
                # Every rank received rank 0's state: give each rank its own noise again and drop
                # the half-filled window, which holds rank 0's draws on every rank.
                for c, gen in enumerate(self.monitor.sampler.generators):
                    gen.manual_seed(kwargs["seed"] * 1000003 + c + 7 * self.monitor.shadow_steps)
                self.monitor.stats.drop_pending()
            self._pending_state = None
        self._last_global_step = int(trainer.global_step)

    @staticmethod
    def _dataset_length(trainer: Any) -> int:
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        try:
            n = len(dataset) if dataset is not None else None
        except TypeError:
            n = None
        if not n:
            raise ValueError(
                "Expected `num_samples` to be given: the train dataloader's dataset has no length "
                "(an IterableDataset or a combined loader), so n cannot be known."
            )
        return int(n)

    @staticmethod
    def _gather(trainer: Any) -> Callable[[np.ndarray], np.ndarray]:
        strategy = trainer.strategy

        def gather(arr: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(arr, dtype=torch.float64, device=strategy.root_device)
            out = strategy.all_gather(t)  # [world, 3, C, W]
            out = out.detach().cpu().numpy()
            return np.concatenate(list(out), axis=1)  # [3, world * C, W], rank order

        return gather

    # ---- the hook --------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.monitor is None:
            return
        step = int(trainer.global_step)
        if step == self._last_global_step:
            return  # a micro-batch of gradient accumulation: no optimizer step happened
        self._last_global_step = step
        if self.failure is not None:
            if self._world_size > 1:
                # A failed rank keeps joining each window's collective with flagged placeholders:
                # skipping it would leave the other ranks waiting forever.
                self.monitor.skip_step(step)
            return
        shadow_before = self.monitor.shadow_steps
        try:
            with trainer.precision_plugin.forward_context():
                est = self.monitor.update(batch, step)
        except Exception as exc:  # noqa: BLE001 - the monitor must not kill training
            if self.strict:
                raise MonitorError(f"OnlineLLCCallback failed at step {step}: {exc!r}") from exc
            self.failure = f"step {step}: {type(exc).__name__}: {exc}"
            due = step % self.monitor.every_n_steps == 0
            if self._world_size > 1 and due and self.monitor.shadow_steps == shadow_before:
                # The failed step's draw never reached the window: add its placeholder now.
                self.monitor.skip_step(step)
            warnings.warn(
                f"OnlineLLCCallback disabled itself after a failure ({self.failure}); training continues. "
                "Pass strict=True to raise instead.",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        if est is not None:
            self._log(trainer, pl_module, est)
            for alarm in self.monitor.health().alarms:
                kind = alarm.split(":", 1)[0]
                if kind not in self._alarms_seen and trainer.is_global_zero:
                    warnings.warn(f"OnlineLLCCallback at step {step}: {alarm}", RuntimeWarning, stacklevel=2)
                self._alarms_seen.add(kind)
        if self.monitor.last_group_estimates:
            metrics = {}
            for name, g in self.monitor.last_group_estimates.items():
                metrics[f"llc/{name}/mean"], metrics[f"llc/{name}/std"] = float(g.mean), float(g.std)
            for k, v in metrics.items():
                trainer.callback_metrics[k] = torch.tensor(v)
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=trainer.global_step)

    def _log(self, trainer: Any, pl_module: Any, est: LLCEstimate) -> None:
        values = (
            est.mean,
            est.std,
            est.lower,
            est.upper,
            float(STATUSES.index(est.status)),
            est.var_channel,
            est.ratio,
            est.consistency,
        )
        metrics = dict(zip(LOGGED_KEYS, (float(v) for v in values)))
        for k, v in metrics.items():
            trainer.callback_metrics[k] = torch.tensor(v)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        if self.prog_bar and math.isfinite(est.mean):
            pl_module.log("llc", est.mean, prog_bar=True, logger=False, on_step=True, on_epoch=False)

    # ---- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        if self.monitor is None:
            return dict(self._pending_state) if self._pending_state is not None else {}
        state = self.monitor.state_dict()
        state["failure"] = self.failure
        state["last_global_step"] = self._last_global_step
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if not state_dict:
            return
        state = dict(state_dict)
        self.failure = state.pop("failure", None)
        state.pop("last_global_step", None)
        # The monitor is built at on_train_start (it needs the dataloader); keep the state until then.
        self._pending_state = state

