"""The non-finite guard: a step whose loss or gradients hold NaN or infinity never reaches the weights.

A diverging run (a learning rate far too high, an fp16 overflow, a bad box) otherwise goes on to
write NaN weights under ``last.ckpt`` and ``best``, exits 0 and shows only ``nan`` in a progress
bar. The guard looks after the backward pass and before the optimiser step, where both the loss of
the step and its gradients exist and nothing is changed yet:

- ``action="stop"`` (default) raises `NonFiniteError`, one message naming the step, the loss terms
  with their values and what to try; the weights are still those of the last good step, so the
  exception checkpoint is finite and resumable;
- ``action="skip"`` drops the step (every gradient is set to None, which torch's optimisers read as
  "no update": no momentum, no weight decay), logs ``train/nonfinite_steps_skipped`` and stops after
  ``max_consecutive_skips`` bad steps in a row.

Under DDP the decision is taken together: a NaN on one rank becomes every rank's NaN once DDP has
averaged the gradients, and every rank's loss terms and flags are all-gathered, so every rank stops
or skips on the same step, none waits for a peer that left, and each message names the rank the NaN
came from (rank 0's may be the only one printed: the launcher ends the other ranks when it stops).
With a gradient scaler (fp16), infinite gradients are the
scaler's business (it skips those steps itself), so only the loss is checked there.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("anchordet.guard")
ACTIONS = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient and the guard stopped it."""


def losses_are_finite(losses: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(value).all()) for value in losses.values())


def gradients_are_finite(module: torch.nn.Module) -> bool:
    gradients = [p.grad for p in module.parameters() if p.grad is not None]
    # One norm over every gradient (a NaN or inf anywhere makes it non-finite): a single reduction
    # instead of a check per tensor.
    return not gradients or bool(torch.isfinite(torch.nn.utils.get_total_norm(gradients)))


class NonFiniteGuard(Callback):
    """Stops (or skips) every optimiser step whose loss or gradients are not finite.

    Args:
        action: "stop" (raise `NonFiniteError`) or "skip" (drop the step and go on).
        max_consecutive_skips: with "skip", stop after this many bad steps in a row.

    Reads ``pl_module.last_losses`` (the step's loss terms, detached), which `DetectionModule` sets.
    """

    def __init__(self, action: str = "stop", max_consecutive_skips: int = 3) -> None:
        if action not in ACTIONS:
            raise ValueError(f"callbacks.nonfinite_guard.action={action!r}: use one of {ACTIONS}")
        if int(max_consecutive_skips) < 1:
            raise ValueError(f"callbacks.nonfinite_guard.max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        self.action, self.max_consecutive_skips = action, int(max_consecutive_skips)
        self.skipped_total = self.skipped_in_a_row = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        losses = getattr(pl_module, "last_losses", None) or {}
        loss_ok = losses_are_finite(losses)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        grads_ok = scaler is not None or gradients_are_finite(pl_module)
        # Every rank must take the same branch, and every rank's message should name the rank the
        # NaN came from: rank 0 may be the only one to print before the launcher ends the others.
        # So each rank's loss terms and flags are gathered (one collective, as a boolean reduce is).
        states = self._gather(trainer, pl_module, losses, loss_ok, grads_ok)
        if all(loss_ok and grads_ok for _, loss_ok, grads_ok in states):
            self.skipped_in_a_row = 0
            return
        message = self._describe(trainer, list(losses), states)
        if self.action == "stop":
            raise NonFiniteError(message)
        self.skipped_total += 1
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= self.max_consecutive_skips:
            raise NonFiniteError(f"{message} ({self.skipped_in_a_row} such steps in a row: stopping)")
        for parameter in pl_module.parameters():
            parameter.grad = None
        log.warning("%s; step skipped (%d so far)", message, self.skipped_total)
        pl_module.log("train/nonfinite_steps_skipped", float(self.skipped_total), on_step=True, on_epoch=False)

    @staticmethod
    def _gather(trainer: L.Trainer, pl_module: L.LightningModule, losses: dict, loss_ok: bool,
                grads_ok: bool) -> list[tuple[list[float], bool, bool]]:
        """[(loss values, loss finite, gradients finite)] for every rank, in rank order."""
        # Built on the device and read back once (tolist), not one host sync per loss term.
        flags = torch.tensor([float(loss_ok), float(grads_ok)], dtype=torch.float64, device=pl_module.device)
        values = [value.detach().to(flags).reshape(()) for value in losses.values()]
        state = torch.cat([torch.stack(values), flags]) if values else flags
        gathered = trainer.strategy.all_gather(state) if trainer.world_size > 1 else state
        gathered = gathered.reshape(-1, state.numel()).tolist()  # [world, terms + 2]
        return [(row[:-2], bool(row[-2]), bool(row[-1])) for row in gathered]

    @staticmethod
    def _describe(trainer: L.Trainer, names: list[str], states: list[tuple[list[float], bool, bool]]) -> str:
        parts = []
        for rank, (values, loss_ok, grads_ok) in enumerate(states):
            if loss_ok and grads_ok:
                continue
            what = (["the loss is not finite"] if not loss_ok else []) + \
                   (["the gradients are not finite"] if not grads_ok else [])
            terms = ", ".join(f"{name}={value:.4g}" for name, value in zip(names, values)) or "no loss terms"
            parts.append(f"{' and '.join(what)} ({terms} on rank {rank})")
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        return (f"non-finite training step {trainer.global_step} (epoch {trainer.current_epoch}): "
                f"{'; '.join(parts)}. Try a lower "
                f"optim.optimizer.lr (now {lr:.3g}), trainer.precision=32-true, a smaller "
                f"trainer.gradient_clip_val (now {trainer.gradient_clip_val}), or "
                "callbacks.nonfinite_guard.action=skip to drop such steps")
