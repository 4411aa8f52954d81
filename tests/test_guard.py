"""The non-finite guard in real Lightning fits of a one-weight model, so every step is known."""

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from anchordet.guard import NonFiniteError, NonFiniteGuard

NAN, GRAD_NAN = float("nan"), 0.0  # batch values: a NaN loss / a finite loss with a NaN gradient


class OneWeight(L.LightningModule):
    """loss = (w x - 1)^2 for a batch value x; x = 0 gives loss sqrt(w x) instead: finite (0) with a
    NaN gradient (0 / (2 sqrt 0))."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))
        self.history: list[float] = []

    def training_step(self, batch, batch_idx):
        x = batch[0]
        loss = torch.sqrt(self.w * x) if x == 0 else (self.w * x - 1) ** 2
        self.last_losses = {"loss_fit": loss.detach()}
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.history.append(self.w.item())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=0.1)


def fit(values, guard):
    model = OneWeight()
    loader = DataLoader([torch.tensor([v]) for v in values], batch_size=None)
    trainer = L.Trainer(max_epochs=1, callbacks=[guard], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    return model, trainer, loader


def test_stop_names_the_step_and_the_loss_terms_and_leaves_the_weights_of_the_last_good_step():
    model, trainer, loader = fit([2.0, NAN, 2.0], NonFiniteGuard())
    with pytest.raises(NonFiniteError, match=r"non-finite training step 1 \(epoch 0\): the loss is not finite and "
                                             r"the gradients are not finite \(loss_fit=nan on rank 0\)\. Try a lower "
                                             r"optim.optimizer.lr \(now 0.01\)"):
        trainer.fit(model, loader)
    assert len(model.history) == 1 and math.isfinite(model.w.item())
    assert model.w.item() == model.history[0]  # the bad step changed nothing


def test_a_finite_loss_with_non_finite_gradients_is_caught_too():
    model, trainer, loader = fit([2.0, GRAD_NAN], NonFiniteGuard())
    with pytest.raises(NonFiniteError, match="the gradients are not finite \\(loss_fit=0 "):
        trainer.fit(model, loader)


def test_skip_drops_the_step_entirely_and_goes_on():
    guard = NonFiniteGuard(action="skip", max_consecutive_skips=2)
    model, trainer, loader = fit([2.0, NAN, 2.0, GRAD_NAN, 2.0], guard)
    trainer.fit(model, loader)
    w = model.history
    # The skipped steps moved nothing: no gradient, no momentum, no weight decay.
    assert w[1] == w[0] and w[3] == w[2] and w[2] != w[1] and w[4] != w[3]
    assert guard.skipped_total == 2 and trainer.global_step == 5
    assert all(math.isfinite(v) for v in w)


def test_skip_stops_after_too_many_bad_steps_in_a_row():
    model, trainer, loader = fit([2.0, NAN, NAN, NAN, 2.0], NonFiniteGuard(action="skip", max_consecutive_skips=3))
    with pytest.raises(NonFiniteError, match="3 such steps in a row: stopping"):
        trainer.fit(model, loader)
    assert model.history[1] == model.history[2] == model.history[0]


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="callbacks.nonfinite_guard.action"):
        NonFiniteGuard(action="ignore")
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        NonFiniteGuard(action="skip", max_consecutive_skips=0)
