"""Hugging Face ``transformers`` adapter: ``OnlineLLCTrainerCallback(...).attach(trainer)``.

Flow: training loop -> ShadowSampler -> WindowStats -> LLCFilter -> OnlineLLC records ->
**callbacks**. A thin adapter over :class:`online_llc.OnlineLLC`, like the Lightning one: the
Trainer's hooks translate into ``monitor.update`` calls, closed windows into ``trainer.log``
calls, and the monitor's ``state_dict`` into a file in each Trainer checkpoint.

How it meets the Trainer (``transformers`` 5.x):

* **The batch.** No callback hook receives the training batch, so a forward pre-hook on the
  model keeps a reference to the keyword arguments of the last training forward (the Trainer
  calls ``model(**inputs)``); forwards without gradients (evaluation) and the monitor's own
  passes are ignored. ``on_step_end`` fires once per optimizer step, after the update, so the
  shadow step runs at the new weights on the last micro-batch of the step: one shadow step per
  optimizer step under gradient accumulation. Nothing is drawn from the data or the global RNG:
  training order and randomness are untouched.
* **Logging.** Callbacks run after the ``report_to`` integrations, so keys added to ``logs`` in
  ``on_log`` would not reach them; the callback calls ``trainer.log`` instead, which every
  integration (TensorBoard, W&B, ...) and ``trainer.state.log_history`` receive. It needs the
  trainer: :meth:`OnlineLLCTrainerCallback.attach`.
* **Checkpoints.** ``on_save`` writes ``<name>.rank<r>.pt`` (``torch.save`` of the monitor's
  state: tensors and plain values, loadable with ``weights_only=True``) into
  ``{output_dir}/checkpoint-{global_step}``; a resumed run (``global_step > 0`` when training
  begins) reads it back from the same place, so the estimate's history continues. Each rank
  keeps its own chains. (``TrainerState.stateful_callbacks`` holds JSON only and rebuilds the
  callback from its arguments, which would drop the loss function and the trainer.)
* **DDP.** Every rank runs its own chains on its own batch; each window's draws are
  all-gathered (``torch.distributed``), so every rank holds the same filter state.
"""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext
from dataclasses import asdict
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np
import torch

from online_llc.callbacks._failure import monitor_failed, placeholders_after_failure, placeholders_stopped
from online_llc.callbacks._metrics import LOGGED_KEYS, estimate_metrics, group_metrics
from online_llc.callbacks._resume import everyone, load_problem, read_merged, read_state, start_afresh
from online_llc.callbacks._trainer import add_band_layout, show_in_progress_line
from online_llc.errors import MonitorError
from online_llc.kernel.evaluator import LossFn
from online_llc.kernel.fsdp import is_fsdp2
from online_llc.models.losses import causal_lm_loss, sequence_classification_loss
from online_llc.monitor.estimator import OnlineLLC
from online_llc.monitor.settings import MonitorSettings

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "online_llc.callbacks.OnlineLLCTrainerCallback needs transformers: pip install 'online-llc[hf]'"
    ) from exc

__all__ = ["OnlineLLCTrainerCallback", "LOGGED_KEYS", "TASKS"]

#: Tasks with a default per-sample loss (``"auto"`` picks one from the model's class name).
TASKS = {"causal_lm": causal_lm_loss, "sequence_classification": sequence_classification_loss}

_STATE_VERSION = 1


def _task_of(model: Any) -> str:
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    if name.endswith("ForSequenceClassification"):
        return "sequence_classification"
    raise ValueError(
        f"Expected `loss_fn` or `task` to be given: the task of a {name} cannot be told from its class name "
        f"(known: {', '.join(TASKS)})."
    )


class OnlineLLCTrainerCallback(TrainerCallback):
    """Track the local learning coefficient of a ``transformers`` model while a ``Trainer`` trains it.

    Every ``every_n_steps``-th optimizer step (``state.global_step``) it runs one shadow SGLD step
    on that step's last micro-batch; when a window closes it logs :data:`LOGGED_KEYS` (and
    ``llc/<group>/<key>`` over ``GROUP_KEYS``) through ``trainer.log``, so they reach every
    ``report_to`` integration (TensorBoard shows them as ``train/llc/mean``, ...) and
    ``trainer.state.log_history``.

    Use::

        trainer = Trainer(model=model, args=args, train_dataset=train_set)
        llc = OnlineLLCTrainerCallback(every_n_steps=10).attach(trainer)
        trainer.train()
        llc.monitor.history()

    Args:
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]`` per-sample losses, ``batch`` being the
            keyword arguments of the training forward (``input_ids``, ``attention_mask``,
            ``labels``, ...). ``None``: the default of ``task``.
        task: ``"auto"`` (from the model's class: ``...ForCausalLM`` / ``...LMHeadModel`` or
            ``...ForSequenceClassification``), ``"causal_lm"``
            (:func:`online_llc.models.losses.causal_lm_loss`) or ``"sequence_classification"``
            (:func:`online_llc.models.losses.sequence_classification_loss`). Ignored with a ``loss_fn``.
        groups: parameter groups tracked beside the whole model, as in
            :class:`online_llc.OnlineLLC` (see :mod:`online_llc.models.groups`; names are the model's).
        strict: re-raise a failure of the monitor instead of warning once and disabling it.
        name: the checkpoint file's stem (``<name>.rank<r>.pt``); give each of several
            callbacks its own.
        probes: probe sets (batches as the Trainer gives the model), as in :class:`online_llc.OnlineLLC`:
            each logs ``llc/probe/<set>/<key>`` over ``PROBE_KEYS``. Not with FSDP2 yet.
        **options: the monitor's options, as in :class:`online_llc.OnlineLLC` (each a field of
            :class:`online_llc.monitor.settings.MonitorSettings`), validated now. ``num_samples`` may be
            left out: it is then the length of the train dataloader's dataset. When the monitor
            has a ``total_steps`` option and it is left out, the Trainer's ``max_steps`` is used.

    Attributes:
        monitor: the :class:`online_llc.OnlineLLC` (created when training begins).
        failure: why the monitor was disabled, or ``None``.
        trainer: the ``Trainer`` given to :meth:`attach`, or ``None``.
    """

    def __init__(
        self,
        loss_fn: Optional[LossFn] = None,
        *,
        task: str = "auto",
        groups: Optional[Mapping[str, Any]] = None,
        strict: bool = False,
        name: str = "online_llc",
        probes: Optional[Mapping[str, Any]] = None,
        **options: Any,
    ) -> None:
        MonitorSettings.reject_unknown("OnlineLLCTrainerCallback()", options)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"Expected `loss_fn` to be callable as loss_fn(model, batch), got {loss_fn!r}.")
        if task != "auto" and task not in TASKS:
            raise ValueError(f"Expected `task` to be one of 'auto', {', '.join(map(repr, TASKS))}, got {task!r}.")
        if not isinstance(name, str) or not name or os.sep in name or "/" in name:
            raise ValueError(f"Expected `name` to be a non-empty file stem without a path separator, got {name!r}.")
        self.settings = MonitorSettings(**options)
        self.loss_fn = loss_fn
        self.task = task
        self.groups, self.probes = (dict(groups) if groups is not None else None), probes
        self.strict, self.name = bool(strict), name
        self.trainer: Any = None
        self.monitor: Optional[OnlineLLC] = None
        self.failure: Optional[str] = None
        self.resume_from: Optional[str] = None
        self._given = frozenset(options)
        self._batch: Any = None
        self._hook: Any = None
        self._in_pass, self._last_step = False, None
        self._alarms_seen: set = set()
        self._world_size, self._rank = 1, 0

    # ---- wiring ----------------------------------------------------------------------------------
    def attach(self, trainer: Any) -> "OnlineLLCTrainerCallback":
        """Hold ``trainer`` (for ``trainer.log`` and its autocast context) and add this callback
        to it unless it is already there. Returns ``self``."""
        if not callable(getattr(trainer, "log", None)) or not hasattr(trainer, "callback_handler"):
            raise TypeError(f"Expected `trainer` to be a transformers.Trainer, got {type(trainer).__name__}.")
        self.trainer = trainer
        if not any(cb is self for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        return self

    def restore_from(self, checkpoint_dir: str) -> "OnlineLLCTrainerCallback":
        """Read the monitor's state from ``checkpoint_dir`` when training begins, for a
        checkpoint outside ``args.output_dir`` (inside it, a resumed run finds its own). Returns ``self``."""
        self.resume_from = os.fspath(checkpoint_dir)
        return self

    @property
    def seed(self) -> int:
        """The user's seed (under DDP the monitor seeds rank ``r``'s chains from ``seed + 104729 r``)."""
        return self.settings.seed

    def _file(self, checkpoint_dir: str, rank: int) -> str:
        return os.path.join(checkpoint_dir, f"{self.name}.rank{rank}.pt")

    # ---- training begins -------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, train_dataloader: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("Expected the Trainer to pass `model` to on_train_begin, got none.")
        loss_fn = self.loss_fn or TASKS[self.task if self.task != "auto" else _task_of(model)]
        self._world_size, self._rank = self._topology(args)
        # The user's seed: under DDP the monitor derives each rank's chain seed from it.
        options: Dict[str, Any] = asdict(self.settings)
        if options.get("num_samples") is None:
            options["num_samples"] = self._dataset_length(train_dataloader)
        # The monitor's run length, for its automatic cadence, when it has that option.
        if "total_steps" in MonitorSettings.names() and "total_steps" not in self._given:
            total = int(getattr(state, "max_steps", 0) or 0) or int(getattr(args, "max_steps", 0) or 0)
            if total > 0:
                options["total_steps"] = total
        # FSDP2 (accelerate's fsdp_version=2): the chains span the ranks, every rank holds every draw.
        gather = self._gather(args) if self._world_size > 1 and not is_fsdp2(model) else None
        self._fresh = lambda: OnlineLLC(model, loss_fn, gather=gather, groups=self.groups, probes=self.probes, **options)
        self.monitor = self._fresh()
        self.failure, self._layout_written = None, False
        self._restore(args, state)
        self._last_step = int(state.global_step)
        self._batch = None
        if self._hook is not None:
            self._hook.remove()
        self._hook = model.register_forward_pre_hook(self._capture, with_kwargs=True)
        if self.trainer is None and state.is_world_process_zero:
            warnings.warn(
                "OnlineLLCTrainerCallback is not attached to its Trainer: llc/* go to trainer.state.log_history "
                "only, not to the report_to integrations. Call callback.attach(trainer).",
                RuntimeWarning,
                stacklevel=2,
            )

    @staticmethod
    def _topology(args: Any) -> tuple:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return int(getattr(args, "world_size", 1) or 1), int(getattr(args, "process_index", 0) or 0)

    def _dataset_length(self, loader: Any) -> int:
        for source in (getattr(loader, "dataset", None), getattr(self.trainer, "train_dataset", None)):
            try:
                n = len(source) if source is not None else 0
            except TypeError:
                n = 0
            if n:
                return int(n)
        raise ValueError(
            "Expected `num_samples` to be given: the train dataset has no length (an IterableDataset), so n "
            "cannot be known."
        )

    def _gather(self, args: Any) -> Callable[[np.ndarray], np.ndarray]:
        world = self._world_size
        device = getattr(args, "device", torch.device("cpu"))

        def gather(arr: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(arr, dtype=torch.float64, device=device)
            parts = [torch.empty_like(t) for _ in range(world)]
            torch.distributed.all_gather(parts, t)
            return np.concatenate([p.cpu().numpy() for p in parts], axis=1)  # [k, world * C, W], rank order

        return gather

    def _restore(self, args: Any, state: Any) -> None:
        """Load this rank's state from the checkpoint (rank 0's where this rank's is missing,
        unreadable or from another world size). Every decision is agreed by all ranks before the
        next one (their windows must stay aligned for the collectives), and nothing here raises
        before an agreement: a state that cannot be read, one that does not load (taken with
        other settings) and one whose monitor had failed all start a fresh monitor on every rank,
        with a warning (``strict``: a ``MonitorError``, except for a saved failure)."""
        where = self.resume_from
        if where is None and int(state.global_step) > 0:  # a resumed run: its checkpoint is in output_dir
            where = os.path.join(args.output_dir, f"checkpoint-{int(state.global_step)}")
        if where is None:
            return
        own, first = self._file(where, self._rank), self._file(where, 0)
        device = getattr(args, "device", None)
        saved, why = read_state(own, _STATE_VERSION)
        mine = saved is not None and saved.get("world_size") == self._world_size
        if not mine:
            saved, why_first = read_state(first, _STATE_VERSION)
            why = why or why_first
        found = saved is not None
        if self._world_size > 1:
            mine, found = everyone(device, mine), everyone(device, found)
            if found and not mine:
                saved, why = read_state(first, _STATE_VERSION)
        if found and not mine:  # rank 0's state; its shards alone (FSDP2) restore no rank: all, merged
            if saved is not None:
                saved, why = read_merged(saved, lambda r: self._file(where, r), _STATE_VERSION)
            found = everyone(device, saved is not None)
        problem, failure = None, None
        if not found:
            problem = f"no monitor state {own!r} in the checkpoint" if why is None else why
        else:
            assert saved is not None
            failure = saved.pop("failure", None)
            if failure is not None:
                # A failure is a run's, not the checkpoint's: a resumed run gets a fresh monitor.
                problem = f"the monitor saved in {where!r} had failed ({failure})"
            else:
                for key in ("format", "rank", "world_size"):
                    saved.pop(key, None)
                why_not = load_problem(self.monitor, saved)
                if why_not is not None:
                    problem = f"{own if mine else first!r}, which {why_not}"
        if self._world_size > 1 and not everyone(device, problem is None) and problem is None:
            problem = "another rank's monitor state could not be restored"
        if problem is not None:
            self.monitor = self._fresh()  # nothing half-loaded
            start_afresh("OnlineLLCTrainerCallback", problem, state.global_step, strict=self.strict and failure is None,
                         stacklevel=3)
            return
        if not mine:
            # Every rank holds rank 0's state (another world size, or a rank's file is missing):
            # each rank's chains become its own again.
            self.monitor.reseed_for_rank(self._rank)

    # ---- the batch -------------------------------------------------------------------------------
    def _capture(self, module: Any, args: tuple, kwargs: Dict[str, Any]) -> None:
        # Training forwards only: evaluation runs without gradients, and the monitor's own passes
        # call the model too.
        if self._in_pass or not torch.is_grad_enabled():
            return None
        if kwargs:
            self._batch = {k: v for k, v in kwargs.items() if k != "num_items_in_batch"}
        elif len(args) == 1:
            self._batch = args[0]
        return None

    # ---- the hook --------------------------------------------------------------------------------
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        step = int(state.global_step)
        if step == self._last_step:
            return
        self._last_step = step
        batch, self._batch = self._batch, None
        if self.failure is not None:
            if self._world_size > 1 and not placeholders_stopped(self.failure):
                # A failed rank keeps joining each window's collective with flagged placeholders:
                # skipping it would leave the other ranks waiting forever.
                self.failure = placeholders_after_failure("OnlineLLCTrainerCallback", self.monitor, step, self.failure)
            return
        shadow_before = self.monitor.shadow_steps
        context = self.trainer.compute_loss_context_manager() if self.trainer is not None else nullcontext()
        self._in_pass = True
        try:
            if batch is None and step % self.monitor.every_n_steps == 0:
                raise RuntimeError("no training batch was captured: the model was not called as model(**inputs)")
            with context:
                est = self.monitor.update(batch, step)
        except Exception as exc:  # noqa: BLE001 - the monitor must not kill training
            self.failure = monitor_failed("OnlineLLCTrainerCallback", self.monitor, step, exc, strict=self.strict,
                                          world_size=self._world_size)
            return
        finally:
            self._in_pass = False
        health = self.monitor.health() if est is not None else None
        metrics = estimate_metrics(est, health, self.monitor.probes) if est is not None else {}
        if self.monitor.shadow_steps != shadow_before:  # group estimates are those of this shadow step
            metrics.update(group_metrics(self.monitor.last_group_estimates, self.monitor.group_probes))
        if metrics:
            self._log(state, control, metrics)
        if est is not None and self.trainer is not None:
            show_in_progress_line(self.trainer.callback_handler.callbacks, est)
        if health is not None:
            for alarm in health.alarms:
                kind = alarm.split(":", 1)[0]
                if kind not in self._alarms_seen and state.is_world_process_zero:
                    warnings.warn(f"OnlineLLCTrainerCallback at step {step}: {alarm}", RuntimeWarning, stacklevel=2)
                self._alarms_seen.add(kind)

    def _log(self, state: Any, control: Any, metrics: Dict[str, float]) -> None:
        if self.trainer is not None and not self._layout_written:  # once per run
            self._layout_written = add_band_layout(self.trainer.callback_handler.callbacks, self.monitor.groups)
        if self.trainer is not None:
            # Every rank, as the Trainer logs: the integrations write on the main process only.
            # Trainer.log clears `control.should_log`; put it back so that the Trainer's own
            # log due at this step (the loss) still happens.
            pending = control.should_log
            self.trainer.log(dict(metrics))
            control.should_log = pending
        else:
            state.log_history.append({**metrics, "step": int(state.global_step)})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._batch = None

    # ---- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The monitor's state with the callback's own (what ``on_save`` writes)."""
        if self.monitor is None:
            return {}
        # Sharded by FSDP2, each rank saves its own shards of the chains (1/R of them): merged on
        # a resume at another world size (callbacks/_resume.read_merged).
        state = self.monitor.state_dict(shards=self.monitor.evaluator.sharded)
        state.update(format=_STATE_VERSION, failure=self.failure, rank=self._rank, world_size=self._world_size)
        return state

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{int(state.global_step)}")
        path = self._file(folder, self._rank)
        try:
            os.makedirs(folder, exist_ok=True)
            torch.save(self.state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)  # a reader never sees a half-written file
        except Exception as exc:  # noqa: BLE001 - a failed save of the estimate must not stop training
            if self.strict:
                raise MonitorError(f"OnlineLLCTrainerCallback could not save {path!r}: {exc!r}") from exc
            warnings.warn(f"OnlineLLCTrainerCallback could not save {path!r}: {exc}", RuntimeWarning, stacklevel=2)
