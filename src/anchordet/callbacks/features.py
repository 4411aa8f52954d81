"""Feature-map pictures of one fixed validation image: ResNet stages C2-C5 and the pyramid levels.

Forward hooks on ``backbone.body_stages`` (C2..C5) and on the backbone itself (its output is the list
of pyramid levels) capture the activations of one eval-mode forward pass. For every captured map
``[C, Hl, Wl]`` (batch of one):

- ``features/<name>/channels``: the first channels, each normalised on its own (1-99 percentiles);
- ``features/<name>/mean``: the channel mean as a heat map (percentile-normalised, so one hot pixel
  does not wash the rest out);
- ``features/<name>/pca``: the channels projected on their top three principal components as RGB;
- ``features/<name>/activations``: a histogram of all values (``add_histogram``).

``features/input`` shows the image itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from torch import Tensor

from anchordet import plots, viz
from anchordet.callbacks import PictureCallback


class FeatureMapPictures(PictureCallback):
    """Feature maps of validation image ``image_index``, at fit start and every ``every_n_epochs``
    training epochs.

    Args:
        every_n_epochs: draw after every N training epochs (0 = only at fit start, if that is on).
        image_index: which validation image (index into ``datamodule.val_dataset``).
        num_channels: channels in the ``channels`` grid.
        stages: which ResNet stages to hook (a subset of C2..C5); the pyramid levels are always shown.
        at_fit_start: also draw before training (the features of the initial weights).
        min_side: feature pictures are upscaled (nearest) to at least this many pixels.
    """

    def __init__(self, every_n_epochs: int = 2, image_index: int = 0, num_channels: int = 16,
                 stages: Sequence[str] = ("C2", "C3", "C4", "C5"), at_fit_start: bool = True,
                 min_side: int = 256) -> None:
        super().__init__(every_n_epochs, "feature_pictures")
        self.image_index, self.num_channels = int(image_index), int(num_channels)
        self.stages, self.at_fit_start, self.min_side = list(stages), bool(at_fit_start), int(min_side)
        self._image: Tensor | None = None
        self._target: list[dict] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fit_start and self.can_draw(trainer):
            self._draw(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.can_draw(trainer) and self.is_due(trainer.current_epoch + 1):
            self._draw(trainer, pl_module)

    def capture(self, pl_module: L.LightningModule, images: Tensor) -> dict[str, Tensor]:
        """One forward pass of the backbone on ``images`` (normalised float) -> name -> activation.

        Hooks are removed again before returning, also when the forward pass fails.
        """
        backbone = pl_module.detector.backbone
        captured: dict[str, Tensor] = {}
        handles = []
        stages = getattr(backbone, "body_stages", {})
        for name in self.stages:
            if name in stages:
                handles.append(stages[name].register_forward_hook(
                    lambda module, args, output, name=name: captured.__setitem__(name, output.detach())))
        level_names = list(getattr(backbone, "level_names", []))

        def keep_levels(module, args, output) -> None:
            for index, feature in enumerate(output):
                captured[level_names[index] if index < len(level_names) else f"L{index}"] = feature.detach()

        handles.append(backbone.register_forward_hook(keep_levels))
        try:
            with self.eval_mode(pl_module.detector):
                backbone(images)
        finally:
            for handle in handles:
                handle.remove()
        return captured

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with self.timed(trainer):
            writer, step = self.writer(trainer), trainer.global_step
            if self._image is None:
                dataset = self.datamodule(trainer).val_dataset
                self._image, self._target = self.take_samples(dataset, [min(self.image_index, len(dataset) - 1)])
            images, _ = self.to_model_input(pl_module, self._image, self._target)
            writer.add_image("features/input", viz.upscale(self._image[0], self.min_side)[0], step)
            for name, feature in self.capture(pl_module, images).items():
                feature = feature[0].float().cpu()  # [C, Hl, Wl]; the batch holds one image
                writer.add_image(f"features/{name}/channels", plots.channel_grid(feature, self.num_channels), step)
                writer.add_image(f"features/{name}/mean", plots.mean_heatmap(feature, self.min_side), step)
                writer.add_image(f"features/{name}/pca", plots.pca_rgb(feature, self.min_side), step)
                writer.add_histogram(f"features/{name}/activations", feature.flatten(), step)
