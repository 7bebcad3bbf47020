"""PyTorch Lightning adapter: ``Trainer(callbacks=[OnlineLLCCallback(...)])``.

Flow: training loop -> ShadowSampler -> WindowStats -> LLCFilter -> OnlineLLC records ->
**callbacks**. A thin adapter over :class:`online_llc.OnlineLLC`, at the end of the flow: hooks
translate into ``monitor.update`` calls, closed windows into logger calls, and the monitor's
``state_dict`` into the checkpoint. Its options are the monitor's own
(:class:`online_llc.monitor.settings.MonitorSettings`), validated when the callback is built.

Works with the ``lightning`` package (``lightning.pytorch``) and, because Lightning callbacks are
duck-typed, with a ``pytorch_lightning`` Trainer too: pass the same object to either.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np
import torch

from online_llc.callbacks._failure import monitor_failed, placeholders_after_failure, placeholders_stopped
from online_llc.callbacks._metrics import ESTIMATE_KEYS, LOGGED_KEYS, band_layout, estimate_metrics, group_metrics
from online_llc.callbacks._resume import load_problem, start_afresh
from online_llc.kernel.evaluator import LossFn
from online_llc.kernel.fsdp import is_fsdp2
from online_llc.monitor.cadence import Cadence
from online_llc.monitor.estimator import OnlineLLC
from online_llc.monitor.settings import MonitorSettings
from online_llc.records import ChainHealth, LLCEstimate

try:  # the `lightning` package first; `pytorch_lightning` is the same code under another name
    from lightning.pytorch import Callback
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError:  # pragma: no cover - exercised only without `lightning`
    try:
        from pytorch_lightning import Callback
        from pytorch_lightning.loggers import TensorBoardLogger
    except ImportError as exc:  # pragma: no cover
        raise ImportError(
            "online_llc.callbacks.OnlineLLCCallback needs Lightning: pip install 'online-llc[lightning]'"
        ) from exc

__all__ = ["OnlineLLCCallback", "LOGGED_KEYS", "ESTIMATE_KEYS"]

# Strategies whose parameters are sharded or partitioned in ways the shadow chain cannot move
# (FSDP1's flat parameters, DeepSpeed's partitions, XLA). FSDP2 is supported: Lightning's
# ModelParallelStrategy with fully_shard applied in configure_model (online_llc.kernel.fsdp).
_UNSUPPORTED = ("FSDPStrategy", "DeepSpeedStrategy", "XLAStrategy", "XLAFSDPStrategy")

# The entries of the callback's state key, in order. Checkpoints store the callback's state
# under that key, so these names and their order stay as they are.
_STATE_KEY = (
    "every_n_steps",
    "window",
    "seed",
    "nbeta",
    "localization",
    "step_size",
    "num_chains",
    "warmup",
    "num_samples",
    "confidence",
    "process_noise",
    "jump_threshold",
    "max_offset_norm",
    "sampler",
    "friction",
    "groups",
    "group_budget",
)


def _per_sample_method(module: Any, batch: Any) -> torch.Tensor:
    return module.per_sample_loss(batch)


class OnlineLLCCallback(Callback):
    """Track the local learning coefficient of the LightningModule while it trains.

    At every ``every_n_steps``-th optimizer step (from ``trainer.global_step``, so gradient
    accumulation gives one shadow step per optimizer step, never per micro-batch) it runs one
    shadow SGLD step on that step's batch, under the trainer's precision context. With the
    ``"auto"`` defaults, ``every_n_steps`` and ``window`` are sized to the run's length,
    ``trainer.estimated_stepping_batches`` (:mod:`online_llc.monitor.cadence`). When a window closes it
    logs :data:`LOGGED_KEYS` through every logger of the trainer (rank 0, step =
    ``trainer.global_step``) and puts them in ``trainer.callback_metrics``, so another callback
    can use them; warm-up and diverged windows log no ``llc/mean`` (nor its band).
    ``EarlyStopping(monitor="llc/mean")`` works as it is: a strict one is made non-strict at the
    start of training (with a warning), so that its checks before the first estimate are skipped.

    Under DDP every rank runs its own chain(s) with its own seed on its own batch; each window's
    draws are all-gathered in one packed collective, so every rank holds the same filter state and
    ``R`` ranks give ``R * num_chains`` chains at no extra cost per rank. Under FSDP2
    (``ModelParallelStrategy`` with ``fully_shard`` applied in ``configure_model``) each chain
    spans the ranks, sharded like the parameters, and steps on the union of the ranks' batches
    (:mod:`online_llc.kernel.fsdp`); checkpoints hold the chains' full tensors, gathered on every rank.

    Args:
        loss_fn: ``loss_fn(pl_module, batch) -> Tensor[B]`` per-sample losses. ``None``: the
            module's ``per_sample_loss(batch)`` method (zero-config path), if it has one.
        groups: parameter groups tracked beside the whole model, as in
            :class:`online_llc.OnlineLLC`, given as parameter-name patterns (or modules of the
            LightningModule); each logs ``llc/<group>/<key>`` over ``GROUP_KEYS`` (the band
            and status too) when its window closes.
        prog_bar: also show ``llc`` in the progress bar.
        strict: re-raise a failure of the monitor instead of warning once and disabling it.
        probes: probe sets (batches as the module's training batches), as in :class:`online_llc.OnlineLLC`:
            each logs ``llc/probe/<set>/<key>`` over ``PROBE_KEYS``. Not with FSDP2 yet.
        **options: the monitor's options, as in :class:`online_llc.OnlineLLC` (each a field of
            :class:`online_llc.monitor.settings.MonitorSettings`), validated now. ``num_samples`` may be
            left out (``None``): it is then the length of the train dataloader's dataset.

    Attributes:
        monitor: the :class:`online_llc.OnlineLLC` (created when training starts).
        failure: why the monitor was disabled, or ``None``.
    """

    def __init__(
        self,
        loss_fn: Optional[LossFn] = None,
        *,
        groups: Optional[Mapping[str, Any]] = None,
        prog_bar: bool = False,
        strict: bool = False,
        probes: Optional[Mapping[str, Any]] = None,
        **options: Any,
    ) -> None:
        MonitorSettings.reject_unknown("OnlineLLCCallback()", options)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"Expected `loss_fn` to be callable as loss_fn(pl_module, batch), got {loss_fn!r}.")
        # Every option is validated now, with the core's own checks and messages.
        self.settings = MonitorSettings(**options)
        self.loss_fn = loss_fn
        self.prog_bar = bool(prog_bar)
        self.strict = bool(strict)
        # Groups name the LightningModule's parameters: resolved against it at on_train_start.
        self.groups = dict(groups) if groups is not None else None
        self.probes = probes  # batches of the module's inputs, as its training batches
        self.monitor: Optional[OnlineLLC] = None
        self.failure: Optional[str] = None
        self._pending_state: Optional[Mapping[str, Any]] = None
        self._last_global_step: Optional[int] = None
        self._alarms_seen: set = set()  # health alarm kinds already warned about
        self._world_size = 1

    @property
    def num_samples(self) -> Optional[int]:
        """``n`` as given (``None``: the train dataloader's dataset length, read when training starts)."""
        return self.settings.num_samples

    @property
    def seed(self) -> int:
        """The user's seed (under DDP the monitor seeds rank ``r``'s chains from ``seed + 104729 r``)."""
        return self.settings.seed

    # ---- identity ------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        """Distinct for instances with different settings, so several can coexist: Lightning
        refuses two stateful callbacks with the same key. (The loss function is not part of it:
        renaming a function must not orphan a checkpoint's state.)"""
        values = {**asdict(self.settings), "groups": sorted(self.groups) if self.groups else None}
        return self._generate_state_key(**{name: values[name] for name in _STATE_KEY})

    # ---- set-up ----------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        name = type(trainer.strategy).__name__
        if name in _UNSUPPORTED:
            raise ValueError(
                f"OnlineLLCCallback does not support the {name} strategy (sharded or partitioned "
                "parameters it cannot move); use a single device, DDP, or FSDP2: ModelParallelStrategy with "
                "fully_shard applied in configure_model."
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
        # FSDP2: the chains span the ranks and every rank already holds every draw (no gather).
        gather = self._gather(trainer) if self._world_size > 1 and not is_fsdp2(pl_module) else None
        options = {**asdict(self.settings), "num_samples": num_samples, "total_steps": self._total_steps(trainer)}

        def build() -> OnlineLLC:
            with warnings.catch_warnings():
                if not trainer.is_global_zero:  # the cadence's one line, from rank 0 only
                    warnings.simplefilter("ignore", UserWarning)
                return OnlineLLC(pl_module, self.loss_fn or _per_sample_method, gather=gather, groups=self.groups,
                                 probes=self.probes, **options)

        self.monitor = build()
        if self._pending_state is not None:
            # Every rank restores the same (rank 0's) state, so every rank reaches the same outcome.
            state, self._pending_state, failure = self._pending_state, None, self.failure
            problem = None if failure is None else f"a saved monitor that had failed ({failure})"
            if problem is None:
                why_not = load_problem(self.monitor, state)
                problem = None if why_not is None else f"a saved monitor state that {why_not}"
            if problem is not None:  # a fresh monitor, nothing half-loaded; a failure was the old run's
                self.monitor, self.failure = build(), None
                start_afresh("OnlineLLCCallback", problem, trainer.global_step, strict=self.strict and failure is None,
                             stacklevel=2)
            elif self._world_size > 1:
                # Every rank received rank 0's state: each rank's chains become its own again.
                self.monitor.reseed_for_rank(rank)
        self._last_global_step = int(trainer.global_step)
        self._relax_strict_monitors(trainer, self.monitor.cadence)
        for logger in trainer.loggers if trainer.is_global_zero else []:  # the bands as TensorBoard charts
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(band_layout(self.monitor.groups))

    def _total_steps(self, trainer: Any) -> Optional[int]:
        """The run's length for the ``"auto"`` cadence: ``total_steps`` as given; on resume, the
        length the checkpointed schedule was sized for (so the schedule, and the estimate, carry
        on unchanged); else ``trainer.estimated_stepping_batches`` (``None`` when infinite)."""
        if self.settings.total_steps is not None:
            return self.settings.total_steps
        if self._pending_state is not None:
            saved = self._pending_state.get("settings", {}).get("total_steps")
            if saved is not None:
                return int(saved)
        try:
            total = float(trainer.estimated_stepping_batches)
        except Exception:  # noqa: BLE001 - an unknown length only means the default cadence
            return None
        return int(total) if math.isfinite(total) and total >= 1 else None

    def _relax_strict_monitors(self, trainer: Any, c: Cadence) -> None:
        """Let ``EarlyStopping(monitor="llc/...")`` wait for the first estimate.

        The LLC has no value until the chain has warmed up (the estimate keys are never written
        for warm-up windows), and a strict ``EarlyStopping`` raises at any check that comes
        first (Lightning 2.x: ``RuntimeError: Early stopping conditioned on metric ... which is
        not available``). Logging a placeholder would be worse: NaN or inf stops training
        (``check_finite``), a number would be read as the LLC. So any callback with a ``monitor``
        on an ``llc/`` key and ``strict=True`` is set to ``strict=False``, with one warning:
        checks before the first estimate are skipped, later ones see the latest estimate
        (``trainer.callback_metrics`` keeps it between windows).
        """
        for cb in getattr(trainer, "callbacks", []):
            monitor = getattr(cb, "monitor", None)
            if cb is not self and isinstance(monitor, str) and monitor.startswith("llc/"):
                self._guard_top_k(trainer, cb, monitor, c)
            if cb is self or not isinstance(monitor, str) or not monitor.startswith("llc/") or getattr(cb, "strict", None) is not True:
                continue
            cb.strict = False
            if trainer.is_global_zero:
                warnings.warn(
                    f"OnlineLLCCallback set {type(cb).__name__}(monitor={monitor!r}) to strict=False: the LLC has no "
                    f"estimate until the shadow chain has warmed up (at least {c.warmup * c.every_n_steps} "
                    "training steps), so checks before the first estimate are skipped instead of raising. Pass "
                    "strict=False yourself to silence this.",
                    UserWarning,
                    stacklevel=2,
                )

    @staticmethod
    def _guard_top_k(trainer: Any, cb: Any, monitor: str, c: Cadence) -> None:
        """Let ``ModelCheckpoint(monitor="llc/...")`` wait for the first estimate.

        ``ModelCheckpoint`` has no ``strict``: once validation has run it raises when its key is
        missing (Lightning 2.x ``_save_topk_checkpoint``), which it is until the chain has warmed
        up. Its top-k save is wrapped, on this instance only, to skip while the key is absent: a
        checkpoint has nothing to be ranked by before the first estimate. ``save_last`` and
        every later save are untouched.
        """
        save_top_k = getattr(cb, "_save_topk_checkpoint", None)
        if not callable(save_top_k) or getattr(save_top_k, "_waits_for_llc", False):
            return

        def wait_for_llc(trainer_: Any, candidates: Dict[str, Any]) -> None:
            if monitor in candidates:
                save_top_k(trainer_, candidates)

        wait_for_llc._waits_for_llc = True  # type: ignore[attr-defined]
        cb._save_topk_checkpoint = wait_for_llc
        if trainer.is_global_zero:
            warnings.warn(
                f"OnlineLLCCallback: {type(cb).__name__}(monitor={monitor!r}) skips its top-k save until the first "
                f"LLC estimate (at least {c.warmup * c.every_n_steps} training steps) instead of raising.",
                UserWarning,
                stacklevel=3,
            )

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
            out = strategy.all_gather(t)  # [world, k, C, W]
            out = out.detach().cpu().numpy()
            return np.concatenate(list(out), axis=1)  # [k, world * C, W], rank order

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
            if self._world_size > 1 and not placeholders_stopped(self.failure):
                # A failed rank keeps joining each window's collective with flagged placeholders:
                # skipping it would leave the other ranks waiting forever.
                self.failure = placeholders_after_failure("OnlineLLCCallback", self.monitor, step, self.failure)
            return
        shadow_before = self.monitor.shadow_steps
        try:
            with trainer.precision_plugin.forward_context():
                est = self.monitor.update(batch, step)
        except Exception as exc:  # noqa: BLE001 - the monitor must not kill training
            self.failure = monitor_failed("OnlineLLCCallback", self.monitor, step, exc, strict=self.strict,
                                          world_size=self._world_size)
            return
        if est is not None:
            health = self.monitor.health()
            self._log(trainer, pl_module, est, health)
            for alarm in health.alarms:
                kind = alarm.split(":", 1)[0]
                if kind not in self._alarms_seen and trainer.is_global_zero:
                    warnings.warn(f"OnlineLLCCallback at step {step}: {alarm}", RuntimeWarning, stacklevel=2)
                self._alarms_seen.add(kind)
        # Group estimates belong to the shadow step that produced them: not re-logged at the
        # training steps in between.
        if self.monitor.shadow_steps != shadow_before and self.monitor.last_group_estimates:
            self._publish(trainer, group_metrics(self.monitor.last_group_estimates, self.monitor.group_probes))

    def _log(self, trainer: Any, pl_module: Any, est: LLCEstimate, health: ChainHealth) -> None:
        # A warm-up or diverged window is no LLC estimate: its status and diagnostics only.
        self._publish(trainer, estimate_metrics(est, health, self.monitor.probes if self.monitor else None))
        if self.prog_bar and est.filtered and math.isfinite(est.mean):
            pl_module.log("llc", est.mean, prog_bar=True, logger=False, on_step=True, on_epoch=False)

    @staticmethod
    def _publish(trainer: Any, metrics: Dict[str, float]) -> None:
        """Into ``trainer.callback_metrics`` (float32 tensors, like ``self.log``) and, on rank 0,
        every logger of the trainer at ``trainer.global_step``."""
        for k, v in metrics.items():
            trainer.callback_metrics[k] = torch.tensor(v)
        if trainer.is_global_zero and metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

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

