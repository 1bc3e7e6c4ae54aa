"""The network (LoRA) trainer shared by every model family.

Read top to bottom: ``run`` prepares data (before any model is loaded, so bad data fails fast),
loads the family's models, attaches the network, and loops over epochs calling ``_step``.
Everything that differs between SD1/SDXL/SD3 is a call on ``self.family``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from library.config.training_config import TrainingConfig
from library.data.dataset import DatasetGroup, EpochSampler, build_dataset_group, collate_single
from library.data.latent_cache import cache_latents_in_memory
from library.families.base import LoadedModels, ModelFamily
from library.training import optim, saving
from library.training.loss import per_sample_mse, weighted_batch_loss
from library.utils.errors import UserError
from networks.base import NetworkAdapter, import_network_module

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where the run is."""

    epoch: int = 0
    global_step: int = 0


class NetworkTrainer:
    """Trains a network plug-in on one model family."""

    def __init__(self, family: ModelFamily, config: TrainingConfig):
        self.family = family
        self.cfg = config
        self.progress = Progress()

    # ----------------------------------------------------------------- setup
    def prepare_data(self) -> DatasetGroup:
        """Scan and bucket the images; print the summary. No model is needed for this."""
        cfg = self.cfg
        group, report = build_dataset_group(cfg.datasets, cfg.seed, cfg.prior_loss_weight, cfg.strict_dataset)
        for i, ds in enumerate(group.datasets):
            logger.info("dataset %d: %d train images (x repeats), %d reg, batch size %d, %d batches per epoch",
                        i, ds.num_train_images, ds.num_reg_images, ds.config.batch_size, len(ds))
            for (w, h), n in ds.bucket_counts().items():
                logger.info("  bucket %dx%d: %d samples", w, h, n)
        if report.skipped:
            logger.warning("skipped %d file(s):\n  %s", len(report.skipped),
                           "\n  ".join(f"{p}: {why}" for p, why in report.skipped))
        if report.class_token_fallbacks:
            logger.info("%d image(s) have no caption file and use their subset's class_tokens",
                        report.class_token_fallbacks)
        return group

    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        cfg = self.cfg
        if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise UserError("--mixed_precision fp16 needs a CUDA GPU; on CPU use --mixed_precision bf16 or no")
        project = None
        if cfg.logging_dir:
            stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
            project = ProjectConfiguration(project_dir=str(Path(cfg.logging_dir) / f"{cfg.log_prefix}{stamp}"))
        # gradient accumulation is done by the loop itself (it knows where an epoch ends)
        acc = Accelerator(mixed_precision=cfg.mixed_precision, log_with="tensorboard" if project else None,
                          project_config=project)
        if acc.num_processes > 1:
            raise UserError("multi-process training is not supported by this version yet; run one process")
        return acc

    def _weight_dtype(self) -> torch.dtype:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.cfg.mixed_precision, torch.float32)

    def _build_network(self, models: LoadedModels) -> NetworkAdapter:
        net_cfg = self.cfg.network
        module = import_network_module(net_cfg.module)
        te = models.text_encoders[0] if len(models.text_encoders) == 1 else models.text_encoders
        try:
            network = module.create_network(1.0, net_cfg.dim, net_cfg.alpha, models.vae, te, models.denoiser,
                                            **net_cfg.args)
        except (TypeError, ValueError, AssertionError) as exc:
            raise UserError(f"--network_module {net_cfg.module} could not build the network: {exc}") from exc
        if network is None:
            raise UserError(f"--network_module {net_cfg.module}: create_network returned nothing")
        adapter = NetworkAdapter(network)
        network.apply_to(te, models.denoiser, net_cfg.train_text_encoder, net_cfg.train_unet)
        if net_cfg.weights:
            logger.info("network weights: %s", adapter.load_weights(net_cfg.weights))
        return adapter

    # ----------------------------------------------------------------- main
    def run(self) -> Path:
        """Train; return the path of the final network file."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        group = self.prepare_data()
        acc = self._make_accelerator()
        device = acc.device
        models = self.family.load(cfg.model_path, self._weight_dtype(), cfg.tokenizer_dir)
        for m in [models.denoiser, models.vae, *models.text_encoders]:
            m.to(device)
        if cfg.cache_latents:
            cache_latents_in_memory(group, lambda px: self.family.encode_images(models, px), cfg.vae_batch_size,
                                    acc.is_local_main_process)
        adapter = self._build_network(models)
        train_te = cfg.network.train_text_encoder
        if cfg.gradient_checkpointing:
            models.denoiser.enable_gradient_checkpointing()
            adapter.enable_gradient_checkpointing()
            if train_te:
                for te in models.text_encoders:
                    te.gradient_checkpointing_enable()
                    te.train()
        groups, lr_names = adapter.optimizer_groups(cfg.optimizer.text_encoder_lr, cfg.optimizer.unet_lr,
                                                    cfg.optimizer.learning_rate)
        if not groups:
            raise UserError("the network has no trainable parameters (check --network_train_* flags)")
        optimizer = optim.build_optimizer(cfg.optimizer.optimizer_type, groups, cfg.optimizer.learning_rate,
                                          optim.parse_optimizer_args(cfg.optimizer.optimizer_args))
        sampler = EpochSampler(len(group))
        loader = torch.utils.data.DataLoader(
            group, batch_size=1, sampler=sampler, collate_fn=collate_single, num_workers=cfg.num_workers,
            persistent_workers=cfg.persistent_workers and cfg.num_workers > 0)
        steps_per_epoch = math.ceil(len(group) / cfg.gradient_accumulation_steps)
        max_steps = cfg.max_train_epochs * steps_per_epoch if cfg.max_train_epochs else cfg.max_train_steps
        num_epochs = math.ceil(max_steps / steps_per_epoch)
        scheduler = optim.build_lr_scheduler(cfg.optimizer.lr_scheduler, optimizer,
                                             optim.warmup_steps(cfg.optimizer.lr_warmup, max_steps), max_steps,
                                             cfg.optimizer.num_cycles, cfg.optimizer.power)
        network, optimizer, scheduler = acc.prepare(adapter.net, optimizer, scheduler)
        adapter.prepare_grad_etc(models.text_encoders, models.denoiser)
        meta = saving.base_metadata(cfg, self.family.metadata(), group, len(group), num_epochs, max_steps)
        if acc.is_main_process and cfg.logging_dir:
            acc.init_trackers("network_train")
        logger.info("training: %d steps, %d epochs, %d batches per epoch", max_steps, num_epochs, len(group))
        loop = _Loop(self, acc, models, adapter, optimizer, scheduler, lr_names, train_te, meta)
        return loop.train(loader, sampler, num_epochs, max_steps)


class _Loop:
    """The epoch/step loop with its saving, sampling and logging side effects."""

    def __init__(self, trainer: NetworkTrainer, acc, models, adapter, optimizer, scheduler, lr_names, train_te, meta):
        self.t, self.acc, self.models, self.adapter = trainer, acc, models, adapter
        self.optimizer, self.scheduler, self.lr_names = optimizer, scheduler, lr_names
        self.train_te, self.meta = train_te, meta
        self.cfg = trainer.cfg
        self.family = trainer.family
        self.params = adapter.trainable_params()

    def train(self, loader, sampler: EpochSampler, num_epochs: int, max_steps: int) -> Path:
        cfg, acc = self.cfg, self.acc
        step = 0
        bar = tqdm(total=max_steps, desc="steps", disable=not acc.is_local_main_process)
        recent: list[float] = []
        if cfg.sample.at_first:
            self.sample(epoch=None, step=0)
        for epoch in range(num_epochs):
            self.adapter.on_epoch_start(self.models.text_encoders, self.models.denoiser)
            sampler.set_epoch(epoch)
            epoch_losses = []
            accum, micro = cfg.gradient_accumulation_steps, []
            for i, batch in enumerate(loader):
                # an optimizer step every `accum` batches, and at the end of the epoch
                sync = (i + 1) % accum == 0 or i + 1 == len(loader)
                micro.append(self._step(batch, sync, step + 1))
                if not sync:
                    continue
                loss, micro = sum(micro) / len(micro), []
                step += 1
                epoch_losses.append(loss)
                recent = (recent + [loss])[-len(loader):]
                bar.update(1)
                bar.set_postfix(avr_loss=f"{sum(recent) / len(recent):.4f}")
                self._log(step, loss, sum(recent) / len(recent))
                if cfg.save.every_n_steps and step % cfg.save.every_n_steps == 0 and step < max_steps:
                    self.save(saving.step_file_name(cfg.save.output_name, step, cfg.save.extension), step, epoch + 1)
                if cfg.sample.every_n_steps and not cfg.sample.every_n_epochs and step % cfg.sample.every_n_steps == 0:
                    self.sample(epoch=None, step=step)
                if step >= max_steps:
                    break
            if acc.is_main_process and cfg.logging_dir and epoch_losses:
                acc.log({"loss/epoch_average": sum(epoch_losses) / len(epoch_losses)}, step=epoch + 1)
            last_epoch = epoch + 1 == num_epochs or step >= max_steps
            if cfg.save.every_n_epochs and (epoch + 1) % cfg.save.every_n_epochs == 0 and not last_epoch:
                self.save(saving.epoch_file_name(cfg.save.output_name, epoch + 1, cfg.save.extension), step, epoch + 1)
            if cfg.sample.every_n_epochs and (epoch + 1) % cfg.sample.every_n_epochs == 0:
                self.sample(epoch=epoch + 1, step=step)
            if step >= max_steps:
                break
        bar.close()
        final = self.save(saving.final_file_name(cfg.save.output_name, cfg.save.extension), step, epoch + 1)
        acc.end_training()
        return final

    def _step(self, batch: dict, sync: bool, step: int) -> float:
        """Forward and backward on one batch; an optimizer step too when ``sync``."""
        acc, family, models = self.acc, self.family, self.models
        self.adapter.on_step_start(models.text_encoders, models.denoiser)
        dtype = self.t._weight_dtype()
        with torch.no_grad():
            if "latents" in batch:
                latents = batch["latents"].to(acc.device, dtype)
            else:
                latents = family.encode_images(models, batch["images"].to(acc.device)).to(dtype)
        with torch.set_grad_enabled(self.train_te), acc.autocast():
            cond = family.encode_prompts(models, batch["captions"], acc.device)
        noisy = family.make_noisy_batch(latents, torch.randn_like(latents))
        with acc.autocast():
            pred = family.denoise(models, noisy, cond)
        loss = weighted_batch_loss(per_sample_mse(pred, noisy.target), batch["loss_weights"])
        if not torch.isfinite(loss):
            raise UserError(f"the loss became {loss.item()} at step {step}; lower --learning_rate or use "
                            "--mixed_precision no (files saved before this step are intact)")
        acc.backward(loss / self.cfg.gradient_accumulation_steps)
        if sync:
            if self.cfg.optimizer.max_grad_norm > 0:
                acc.clip_grad_norm_(self.params, self.cfg.optimizer.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()

    def _log(self, step: int, loss: float, average: float) -> None:
        if not (self.acc.is_main_process and self.cfg.logging_dir):
            return
        logs = {"loss/current": loss, "loss/average": average}
        for name, lr in zip(self.lr_names, self.scheduler.get_last_lr()):
            logs[f"lr/{name}"] = lr
        self.acc.log(logs, step=step)

    def save(self, file_name: str, step: int, epoch: int) -> Path:
        path = self.cfg.save.output_dir / file_name
        if self.acc.is_main_process:
            meta = saving.metadata_for_save(self.meta, step, epoch, self.cfg.save.no_metadata)
            self.adapter.save(str(path), self.cfg.save.precision, meta)
            logger.info("saved %s", path)
        return path

    def sample(self, epoch: int | None, step: int) -> None:
        prompts = self.cfg.sample.prompts
        if not prompts or not self.acc.is_main_process:
            return
        torch_state, py_state = torch.get_rng_state(), random.getstate()
        was_training = self.adapter.net.training
        self.adapter.net.eval()
        try:
            for i, prompt in enumerate(prompts):
                seed = prompt.seed if prompt.seed is not None else random.randint(0, 2**31 - 1)
                prompt = prompt.__class__(**{**prompt.__dict__, "seed": seed})
                image = self.family.generate(self.models, prompt, prompt.sampler or self.cfg.sample.sampler,
                                             self.acc.device)
                path = saving.sample_file_name(self.cfg.save.output_dir, self.cfg.save.output_name, epoch, step, i,
                                               seed)
                _save_png(image, path, prompt)
                if self.cfg.logging_dir:
                    self._log_image(image, i, step)
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(py_state)
            self.adapter.net.train(was_training)

    def _log_image(self, image, index: int, step: int) -> None:
        tracker = self.acc.get_tracker("tensorboard", unwrap=True)
        tracker.add_image(f"sample_{index}", np.asarray(image), global_step=step, dataformats="HWC")


def _save_png(image, path: Path, prompt) -> None:
    from PIL import PngImagePlugin

    from library.utils.files import atomic_path

    info = PngImagePlugin.PngInfo()
    params = (f"{prompt.prompt}\nNegative prompt: {prompt.negative_prompt}\nSteps: {prompt.steps}, "
              f"CFG scale: {prompt.scale}, Seed: {prompt.seed}, Size: {prompt.width}x{prompt.height}")
    info.add_text("parameters", params)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
