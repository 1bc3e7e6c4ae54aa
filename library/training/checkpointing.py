"""Saving during training: trained files, state folders for resume, and pruning of old ones.

Old files are removed only after the new one is completely written.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from library.config.training_config import SaveConfig
from library.optim.optimizers import optimizer_eval_mode
from library.training import saving
from library.training.sharding import Sharding
from library.training.state import TrainState, save_state
from networks.lora_export import write_diffusers_lora

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where the run is; everything needed to continue exactly."""

    global_step: int = 0
    epoch: int = 0
    batches_done: int = 0  # batches of ``epoch`` already trained
    recent_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)


class Checkpointer:
    """Writes the trained files and state folders with kohya's names, and prunes old ones.
    ``trainable`` is what the run trains (a network adapter or the model's weights): it writes its
    own file; ``what`` (library/training/trained.py) says what a state folder holds besides.
    With ``sharding`` (``--deepspeed``) every process takes part in each save (the whole tensors are
    gathered from all of them) and rank 0 writes."""

    def __init__(self, cfg: SaveConfig, trainable, optimizer, scheduler, base_meta: dict[str, str],
                 run_info: dict, is_main: bool, what, sharding: Sharding | None = None):
        self.cfg, self.trainable, self.optimizer, self.scheduler = cfg, trainable, optimizer, scheduler
        self.base_meta, self.run_info, self.is_main, self.what = base_meta, run_info, is_main, what
        self.sharding = sharding

    def _stem(self, step: int | None = None, epoch: int | None = None) -> str:
        name = self.cfg.output_name
        if step is not None:
            return saving.step_file_name(name, step, "")
        if epoch is not None:
            return saving.epoch_file_name(name, epoch, "")
        return name

    def save_network(self, stem: str, progress: Progress) -> Path:
        path = self.cfg.output_dir / f"{stem}{self.cfg.extension}"
        if self.is_main or self.sharding is not None:  # the trainable writes on rank 0 only
            meta = saving.metadata_for_save(self.base_meta, progress.global_step, progress.epoch + 1,
                                            self.cfg.no_metadata)
            with optimizer_eval_mode(self.optimizer):
                self.trainable.save(str(path), self.cfg.precision, meta)
            if self.is_main:
                logger.info("saved %s", path)
        return path

    def save_state(self, stem: str, progress: Progress) -> Path:
        folder = self.cfg.output_dir / f"{stem}-state"
        whole = None
        if self.sharding is not None:  # collective: rank 0 receives the whole model and optimizer state
            whole = (self.sharding.model_state(self.trainable.net),
                     self.sharding.optimizer_state(self.trainable.net, self.optimizer))
        extra = self.what.extra_state(self.trainable)  # on every process: collective when sharded
        if self.is_main:
            state = TrainState(global_step=progress.global_step, epoch=progress.epoch,
                               batches_done=progress.batches_done, recent_losses=list(progress.recent_losses),
                               epoch_losses=list(progress.epoch_losses), **self.run_info)
            save_state(folder, self.trainable.net, self.optimizer, self.scheduler, state, self.what.state_weights,
                       extra, whole)
            logger.info("saved state %s", folder)
        if self.sharding is not None:
            self.sharding.barrier()
        return folder

    def on_step(self, progress: Progress, is_last: bool) -> None:
        """After an optimizer step: the every-n-steps save (the last step gets the final name instead)."""
        every = self.cfg.every_n_steps
        if not every or progress.global_step % every or is_last:
            return
        stem = self._stem(step=progress.global_step)
        self.save_network(stem, progress)
        self._prune_steps(progress.global_step, every, self.cfg.last_n_steps, state=False)
        if self.cfg.save_state:
            self.save_state(stem, progress)
            self._prune_steps(progress.global_step, every, self.cfg.last_n_steps_state, state=True)

    def on_epoch_end(self, progress: Progress, is_last: bool) -> None:
        """At the end of an epoch (``progress.epoch`` is the finished one, counted from 0)."""
        every = self.cfg.every_n_epochs
        done = progress.epoch + 1
        if not every or done % every or is_last:
            return
        stem = self._stem(epoch=done)
        self.save_network(stem, progress)
        self._prune_epochs(done, every, self.cfg.last_n_epochs, state=False)
        if self.cfg.save_state:
            self.save_state(stem, progress)
            self._prune_epochs(done, every, self.cfg.last_n_epochs_state, state=True)

    def on_train_end(self, progress: Progress) -> Path:
        path = self.save_network(self._stem(), progress)
        if self.cfg.lora_format == "diffusers" and self.is_main:
            with optimizer_eval_mode(self.optimizer):
                folder = write_diffusers_lora(self.trainable.net, self.cfg.output_dir / f"{self._stem()}-diffusers",
                                              self.cfg.precision)
            logger.info("saved the diffusers/PEFT form in %s", folder)
        if self.cfg.save_state or self.cfg.save_state_on_train_end:
            self.save_state(self._stem(), progress)
        return path

    def _remove(self, stem: str, state: bool) -> None:
        if not self.is_main:
            return
        target = self.cfg.output_dir / (f"{stem}-state" if state else f"{stem}{self.cfg.extension}")
        for old in [target] + ([] if state else self.what.companion_files(target)):
            if old.is_dir():
                shutil.rmtree(old)
                logger.info("removed old %s %s", "state" if state else "save", old)
            elif old.is_file():
                old.unlink()
                logger.info("removed old file %s", old)

    def _prune_epochs(self, epoch: int, every: int, keep: int | None, state: bool) -> None:
        """Keep the newest ``keep`` epoch saves: remove the one from ``keep`` saves ago."""
        if keep:
            old = epoch - every * keep
            if old > 0:
                self._remove(self._stem(epoch=old), state)

    def _prune_steps(self, step: int, every: int, keep_steps: int | None, state: bool) -> None:
        """Keep the step saves of the last ``keep_steps`` steps (kohya's rule)."""
        if keep_steps:
            old = step - keep_steps - 1
            old -= old % every
            if old > 0:
                self._remove(self._stem(step=old), state)
