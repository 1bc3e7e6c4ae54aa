"""The trainer shared by every model family and by everything that can be trained.

Read top to bottom: ``run`` prepares data (before any model is loaded, so bad data fails fast),
loads the family's models, builds what is trained (a network plug-in or the model's own weights,
see :mod:`library.training.trained`), and loops over epochs calling ``_step``. Everything that
differs between SD1/SDXL/SD3 is a call on ``self.family``; everything that differs between
training a network and training the model is a call on ``self.what`` or on the trainable it built.
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, broadcast_object_list
from PIL import PngImagePlugin
from tqdm import tqdm

from library.config.training_config import TrainingConfig, loggable_args
from library.data.batch import TrainBatch
from library.data.dataset import DatasetGroup, EpochSampler, build_dataset_group, collate_single
from library.data.dataset_config import fit_to_family
from library.data.latent_cache import cache_latents
from library.data.text_cache import cache_text_outputs, random_caption_options
from library.families.base import LoadedModels, ModelFamily
from library.maths import precision
from library.maths.loss import weighted_batch_loss
from library.maths.rng import SampleRNG
from library.models.compiling import check_toolchain, compile_blocks
from library.models.cpu_conv import route_small_cpu_convolutions
from library.models.fingerprint import module_fingerprint
from library.models.sd_loading import check_file_layout
from library.optim import optimizers as optim
from library.training import kohya_state, saving
from library.training import state as train_state
from library.training.checkpointing import Checkpointer, Progress
from library.training.interrupt import StopRequest, ignore_interrupts
from library.training.residency import PartUse, Residency, settle_frozen_parts
from library.training.sharding import Sharding
from library.training.trained import NetworkTraining
from library.training.validation import Validator, batch_conditioning, batch_latents, make_noisy_batch
from library.utils.errors import Interrupted, UserError
from library.utils.files import atomic_path

logger = logging.getLogger(__name__)


KNOWN_ATTRIBUTES = {"diff_output_preservation"}


def _warn_unused_attributes(group: DatasetGroup) -> None:
    """custom_attributes are free-form; say which ones this trainer does not act on."""
    unused = {k for it in group.items for k in it.subset.custom_attributes} - KNOWN_ATTRIBUTES
    if unused:
        logger.warning("custom_attributes %s are not used by this trainer (known: %s)", sorted(unused),
                       sorted(KNOWN_ATTRIBUTES))


def debug_dataset(group: DatasetGroup, epochs: int) -> None:
    """``--debug_dataset``: print each batch as training would see it, without loading any model."""
    for epoch in range(epochs):
        for index in range(len(group)):
            batch = group[(epoch, index)]
            pixels = batch.images
            print(f"epoch {epoch + 1} batch {index + 1}/{len(group)}: bucket {pixels.shape[3]}x{pixels.shape[2]}, "
                  f"loss weights {batch.loss_weights.tolist()}")
            for path, size, caption in zip(batch.paths, batch.original_sizes, batch.captions):
                print(f"  {path} ({size[0]}x{size[1]}): {caption!r}")
            if batch.masks is not None:
                print(f"  masks: mean {[round(m.mean().item(), 3) for m in batch.masks]}")


def _same_on_all_processes(acc, seed: int) -> int:
    """Every process must use rank 0's seed (a seed drawn at random differs per process)."""
    if acc.num_processes == 1:
        return seed

    return broadcast_object_list([seed])[0]


def _average_gradients(params, device: torch.device) -> None:
    """Average the trained gradients over all processes (what is trained is not DDP-wrapped).
    A gradient held elsewhere (a swapped block's, in host memory) is reduced on ``device``, where
    the process group's backend works, and put back."""
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            continue
        grad = p.grad if p.grad.device == device else p.grad.to(device)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        grad.div_(world)
        if grad is not p.grad:
            p.grad.copy_(grad)


class NonFiniteError(Exception):
    """A NaN/inf loss or gradient; the step that produced it has not been applied."""

    def __init__(self, step: int, what: str):
        super().__init__(what)
        self.step, self.what = step, what


@dataclass
class Schedule:
    """How long the run is."""

    max_steps: int
    num_epochs: int
    batches_per_epoch: int


class Trainer:
    """Trains ``what`` (a network plug-in, or the model itself) on one model family."""

    def __init__(self, family: ModelFamily, config: TrainingConfig, what=None):
        self.family = family
        self.cfg = config
        self.what = what or NetworkTraining.from_config(config)  # the network trainers' default
        self.seed = config.seed
        self.resume: tuple[Path, train_state.TrainState] | None = None
        self.kohya_resume: kohya_state.KohyaState | None = None  # --resume of a state folder kohya wrote
        self.sharding: Sharding | None = None  # --deepspeed: what is trained is split over processes

    # ----------------------------------------------------------------- setup
    def prepare_data(self, world_size: int = 1, rank: int = 0) -> DatasetGroup:
        """Scan and bucket the images; print the summary. No model is needed for this."""
        cfg = self.cfg
        datasets = fit_to_family(cfg.datasets, self.family.size_multiple, self.family.advised_size_multiple,
                                 self.family.title or self.family.name)
        group, report = build_dataset_group(datasets, self.seed, cfg.prior_loss_weight, cfg.strict_dataset,
                                            world_size, rank)
        if rank == 0:
            self._print_data_summary(group, report)
        return group

    def _print_data_summary(self, group: DatasetGroup, report) -> None:
        for i, ds in enumerate(group.datasets):
            logger.info("dataset %d: %d train images (x repeats), %d reg, batch size %d per process, %d batches "
                        "per epoch", i, ds.num_train_images, ds.num_reg_images, ds.config.batch_size, len(ds))
            for (w, h), n in ds.bucket_counts().items():
                logger.info("  bucket %dx%d: %d samples", w, h, n)
        if report.skipped:
            logger.warning("skipped %d file(s):\n  %s", len(report.skipped),
                           "\n  ".join(f"{p}: {why}" for p, why in report.skipped))
        if report.class_token_fallbacks:
            logger.info("%d image(s) have no caption file and use their subset's class_tokens",
                        report.class_token_fallbacks)

    def _make_accelerator(self):

        cfg = self.cfg
        if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise UserError("--mixed_precision fp16 needs a CUDA GPU; on CPU use --mixed_precision bf16 or no")
        project = None
        if cfg.logging_dir:
            stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
            log_dir = str(Path(cfg.logging_dir) / f"{cfg.log_prefix}{stamp}")
            if self.resume and self.resume[1].log_dir:
                log_dir = self.resume[1].log_dir  # continue the same TensorBoard run
            project = ProjectConfiguration(project_dir=log_dir)
        if cfg.ddp_wrapper_flags:
            logger.info("%s tune torch's DistributedDataParallel wrapper; this trainer does not wrap the network (its "
                        "gradients are averaged with one all-reduce per step), so there is nothing for them to change",
                        " and ".join(cfg.ddp_wrapper_flags))
        handlers = [InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.ddp_timeout))] if cfg.ddp_timeout else []
        # gradient accumulation is done by the loop itself (it knows where an epoch ends)
        acc = Accelerator(mixed_precision=cfg.mixed_precision, log_with=list(cfg.trackers) or None,
                          project_config=project, kwargs_handlers=handlers)
        return acc

    def _init_trackers(self, acc, progress: Progress) -> None:
        init = {k: dict(v) for k, v in self.cfg.tracker_init.items()}
        if self.resume and "tensorboard" in self.cfg.trackers:
            # purge_step drops events a killed run wrote after its last state, so steps never overlap
            init.setdefault("tensorboard", {})["purge_step"] = progress.global_step + 1
        config = loggable_args(self.cfg.raw_args) if self.cfg.log_config else None
        acc.init_trackers(self.cfg.tracker_name, config=config, init_kwargs=init)

    def _weight_dtype(self) -> torch.dtype:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.cfg.mixed_precision, torch.float32)

    def _read_resume(self) -> None:
        """Find and check the state to resume from (before anything is loaded); it fixes the seed."""
        if not self.cfg.resume:
            return
        save = self.cfg.save
        folder = train_state.find_latest_state(save.output_dir, save.output_name) if self.cfg.resume == "latest" \
            else Path(self.cfg.resume)
        self.kohya_resume = kohya_state.read_kohya_state(folder)
        if self.kohya_resume is not None:
            logger.info("resuming from kohya's state folder %s (step %d)", folder, self.kohya_resume.global_step)
            return
        state = train_state.read_train_state(folder)
        if state.seed != self.cfg.seed and self.cfg.raw_args.get("seed") is not None:
            logger.warning("--seed %d differs from the state's seed %d; the state's seed is used", self.cfg.seed,
                           state.seed)
        self.seed = state.seed
        self.resume = (folder, state)
        logger.info("resuming from %s (step %d, epoch %d)", folder, state.global_step, state.epoch + 1)

    def _load_models(self, acc, group: DatasetGroup) -> LoadedModels:
        cfg = self.cfg
        models = self.family.load(cfg.model_path, self.what.load_dtype(self._weight_dtype()), cfg.tokenizer_dir,
                                  acc.device if cfg.lowram else None)
        self.what.cast_frozen(self.family, models, self._weight_dtype())
        self.family.place(models, acc.device)
        # before caching: merged base weights change text outputs
        self.what.prepare(models, acc.device, self._weight_dtype())
        if cfg.no_half_vae:
            models.vae.to(torch.float32)
        precision.set_attention(models.denoiser, cfg.attention)
        if cfg.route_small_cpu_convolutions and acc.device.type == "cpu":
            routed = route_small_cpu_convolutions(models.denoiser)
            logger.debug("%d denoiser convolutions run small float32 maps through PyTorch's own kernels", routed)
        if cfg.cache_latents:
            for g in [group] + ([group.validation] if group.validation else []):
                cache_latents(g, lambda px: self.family.encode_images(models, px), cfg.vae_batch_size,
                              self.family.latent_channels, self.family.cache_suffix if cfg.cache_to_disk else None,
                              module_fingerprint(models.vae), acc.is_local_main_process)
        if cfg.cache_text:
            self._cache_text(models, group, acc)
        if cfg.fp8_base:
            fp8 = [models.denoiser] + (list(models.text_encoders) if cfg.fp8_base == "all" else [])
            logger.info("fp8 base weights: %d modules", sum(precision.store_in_fp8(m) for m in fp8))
        return models

    @staticmethod
    def _check_text_cache(group: DatasetGroup) -> None:
        groups = [group] + ([group.validation] if group.validation else [])
        randomised = random_caption_options([it for g in groups for it in g.items])
        if randomised:
            raise UserError(f"--cache_text_encoder_outputs needs fixed captions, but {', '.join(randomised)} "
                            "change them between steps; turn those off or do not cache")

    def _cache_text(self, models: LoadedModels, group: DatasetGroup, acc) -> None:
        groups = [group] + ([group.validation] if group.validation else [])
        family, settings = self.family, self.family.text_encoder_settings(models)
        live = self._live_encoders(models)
        cached = [i for i in range(len(models.text_encoders)) if i not in live]
        if live:  # only the other encoders' parts are cached; the record says which, so no full cache serves
            settings = {**settings, "cached_encoders": cached}

        def encode(captions: list[str]):
            if live:
                return family.encode_prompt_parts(models, captions, acc.device, cached)
            return family.encode_prompts(models, captions, acc.device)

        cache_text_outputs(groups, encode, settings, self.cfg.text_encoder_batch_size,
                           family.cache_suffix if self.cfg.cache_text_to_disk else None, acc.is_local_main_process)

    def _live_encoders(self, models: LoadedModels) -> list[int]:
        """The text encoders that run at every step although text outputs are cached (SD3's
        --use_t5xxl_cache_only: the CLIPs that train); none without caching or by default."""
        return self.what.live_text_encoders(self.family, models) if self.cfg.cache_text else []

    def _enable_checkpointing(self, models: LoadedModels, trainable) -> None:
        models.denoiser.enable_gradient_checkpointing()
        trainable.enable_gradient_checkpointing()
        for te in self.what.checkpointed_text_encoders(self.family, models):
            # transformers 5 renamed the method; older versions only have the old name
            enable = getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable
            enable()
            te.train()

    def _optimization(self, trainable, batches: int):
        """Optimizer, LR schedule, their log names, and the run's length."""
        cfg, o = self.cfg, self.cfg.optimizer
        groups, lr_names = trainable.optimizer_groups(o.text_encoder_lr, o.unet_lr, o.learning_rate)
        if not groups:
            raise UserError(self.what.nothing_to_train)
        optimizer = optim.build_optimizer(o.optimizer_type, groups, o.learning_rate,
                                          optim.parse_optimizer_args(o.optimizer_args))
        steps_per_epoch = math.ceil(batches / cfg.gradient_accumulation_steps)
        max_steps = cfg.max_train_epochs * steps_per_epoch if cfg.max_train_epochs else cfg.max_train_steps
        schedule = Schedule(max_steps, math.ceil(max_steps / steps_per_epoch), batches)
        spec = optim.SchedulerSpec(o.lr_scheduler, optim.warmup_steps(o.lr_warmup, max_steps), max_steps,
                                   o.num_cycles, o.power, o.min_lr_ratio, optim.warmup_steps(o.lr_decay, max_steps),
                                   o.scheduler_type, o.scheduler_args)
        scheduler = optim.build_lr_scheduler(spec, optimizer, initial_lr=o.learning_rate)
        return optimizer, scheduler, lr_names, schedule

    def _start_at_initial_step(self, schedule: Schedule, scheduler) -> Progress:
        """kohya's ``--initial_step`` / ``--initial_epoch`` without a state: the step counter (file
        names, logs, the end of the run) and, unlike kohya, the LR schedule continue from that step;
        the data starts where that step was with ``--skip_until_initial_step``, else at the start of
        its epoch, as in kohya."""
        cfg = self.cfg
        per_epoch = math.ceil(schedule.batches_per_epoch / cfg.gradient_accumulation_steps)
        step = cfg.initial_step if cfg.initial_step is not None else (cfg.initial_epoch - 1) * per_epoch
        return self._start_at(step, schedule, scheduler, cfg.skip_until_initial_step, "--initial_step")

    def _start_at(self, step: int, schedule: Schedule, scheduler, skip_data: bool, flag: str) -> Progress:
        """Progress at ``step`` with the LR schedule advanced to it; with ``skip_data`` the epoch
        continues at that step's batch (found from the sampler's (epoch, index) keys, without reading
        the skipped batches), else from its first batch."""
        accum = self.cfg.gradient_accumulation_steps
        per_epoch = math.ceil(schedule.batches_per_epoch / accum)
        if step >= schedule.max_steps:
            raise UserError(f"{flag} {step} is at or past the end of the run ({schedule.max_steps} steps); "
                            "raise --max_train_steps / --max_train_epochs")
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(step):
                scheduler.step()
        epoch, within = divmod(step, per_epoch)
        batches = within * accum if skip_data else 0
        logger.info("starting at step %d (epoch %d, %s)", step, epoch + 1,
                    f"batch {batches + 1} of it" if skip_data else "from the epoch's first batch")
        return Progress(step, epoch, batches)

    def _restore_kohya(self, trainable, optimizer, scheduler, schedule: Schedule) -> Progress:
        """A kohya state: its trained weights (they must fit), its optimizer state where the layout
        matches, and its step (see :mod:`library.training.kohya_state`)."""
        state = self.kohya_resume
        used = self.what.restore_kohya(state, trainable, optimizer)
        logger.info("kohya state: %s%s loaded", self.what.weights_title, " and optimizer state" if used else "")
        return self._start_at(state.global_step, schedule, scheduler, True, f"--resume {state.folder}: its step")

    def _restore(self, trainable, optimizer, scheduler, batches: int) -> Progress:
        if not self.resume:
            return Progress()
        folder, state = self.resume
        train_state.check_weights_kind(folder, self.what.state_weights)
        train_state.check_compatible(state, self.what.fingerprint(), batches, folder)
        train_state.load_state(folder, trainable.net, optimizer, scheduler, self.what.state_weights, self.sharding)
        self.what.load_extra_state(trainable, train_state.read_extra_state(folder), folder)
        return Progress(state.global_step, state.epoch, state.batches_done, list(state.recent_losses),
                        list(state.epoch_losses))

    # ----------------------------------------------------------------- main
    def run(self) -> Path:
        """Train; return the path of the final file."""
        cfg = self.cfg
        # a wrong file stops before any work, naming the script that trains it
        check_file_layout(cfg.model_path, self.family.checkpoint_layouts, self.what.layout_scripts)
        self.what.check(self.family)
        self._read_resume()
        acc = self._make_accelerator()
        if cfg.compile_backend:
            check_toolchain(cfg.compile_backend, acc.device)
        self.seed = _same_on_all_processes(acc, self.seed)
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        group = self.prepare_data(acc.num_processes, acc.process_index)
        self.what.prepare_captions(group)
        if cfg.debug_dataset:
            return debug_dataset(group, cfg.max_train_epochs or 1)
        if cfg.cache_text:
            self._check_text_cache(group)
        _warn_unused_attributes(group)
        models = self._load_models(acc, group)
        trainable = self.what.build(self.family, models)
        # what is trained is not wrapped in DDP (gradients are averaged explicitly), and the schedule
        # is stepped once per optimizer step whatever the process count
        trainable.to(acc.device, {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.full_half))
        if cfg.full_half == "fp16":
            precision.allow_fp16_gradients(acc.scaler)
        if cfg.gradient_checkpointing:
            self._enable_checkpointing(models, trainable)
        if cfg.compile_backend:  # after the network's hooks and checkpointing: the compiled code traces them
            self._compile_denoiser(models)
        # before the optimizer: it must hold the shards' parameters and keep state for them only
        self.sharding = self.what.shard(trainable, self.family, models, acc)
        optimizer, scheduler, lr_names, schedule = self._optimization(trainable, len(group))
        self.what.check_schedule(schedule.max_steps)
        group.accumulation, group.max_train_steps = cfg.gradient_accumulation_steps, schedule.max_steps
        optimizer = acc.prepare(optimizer)
        trainable.prepare_grad_etc(models.text_encoders, models.denoiser)
        fused = self._fused_steps(acc, trainable, optimizer)
        progress = self._start_position(trainable, optimizer, scheduler, schedule, len(group))
        checkpointer = self._checkpointer(acc, models, group, trainable, optimizer, scheduler, schedule)
        if acc.is_main_process and cfg.trackers:
            self._init_trackers(acc, progress)
        logger.info("training: %d steps, %d epochs, %d batches per epoch", schedule.max_steps, schedule.num_epochs,
                    len(group))
        # the loader gets its own generator: creating an iterator must not consume the global RNG,
        # or a resumed run's noise would differ from the uninterrupted run's
        loader = torch.utils.data.DataLoader(
            group, batch_size=1, sampler=EpochSampler(len(group)), collate_fn=collate_single,
            num_workers=cfg.num_workers, persistent_workers=cfg.persistent_workers and cfg.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed), worker_init_fn=ignore_interrupts)
        loop = _Loop(self, acc, models, trainable, optimizer, scheduler, lr_names, checkpointer,
                     self._validator(acc, models, group), fused, self._settle_frozen_parts(acc, models, group))
        return loop.train(loader, schedule, progress)

    def _settle_frozen_parts(self, acc, models: LoadedModels, group: DatasetGroup) -> Residency:
        """Free the VAE and the text encoders when nothing in the run uses them again (their
        outputs cached for every training and validation image, nothing trains or saves them);
        when only sample images use them, park them off an accelerator between samples."""
        cfg, what = self.cfg, self.what
        items = [it for g in [group] + ([group.validation] if group.validation else []) for it in g.items]
        s = cfg.sample
        samples = bool(s.prompts) and bool(s.every_n_steps or s.every_n_epochs or s.at_first)
        whole = what.saves_whole_model
        latents_cached = all(it.latents is not None for it in items)
        texts_cached = all(it.text_outputs is not None for it in items)
        encoders = [te for te in models.text_encoders if te is not None]
        return settle_frozen_parts({
            "VAE": ([models.vae], PartUse(steps=whole or not latents_cached, samples=samples)),
            "text encoder" + ("s" if len(encoders) > 1 else ""):
                (encoders, PartUse(steps=whole or what.trains_text_encoders or not texts_cached, samples=samples)),
        }, acc.device)

    def _compile_denoiser(self, models: LoadedModels) -> None:
        backend = self.cfg.compile_backend
        count = compile_blocks(models.denoiser, self.family.compiled_blocks, backend)
        logger.info("torch.compile (%s): %d denoiser blocks, each compiled at its first call", backend, count)

    def _fused_steps(self, acc, trainable, optimizer):
        """The optimizer stepped inside backward (--fused_backward_pass, --fused_optimizer_groups), or None."""
        cfg = self.cfg
        if not (cfg.fused_backward or cfg.fused_optimizer_groups):
            return None
        if acc.num_processes > 1:
            flag = "--fused_backward_pass" if cfg.fused_backward else "--fused_optimizer_groups"
            raise UserError(f"{flag} runs on one process only in this version")
        params, max_norm = trainable.trainable_params(), cfg.optimizer.max_grad_norm
        if cfg.fused_backward:
            return optim.FusedBackwardPass(optimizer, params, max_norm)
        return optim.FusedOptimizerGroups(optimizer, params, cfg.fused_optimizer_groups, max_norm)

    def _start_position(self, trainable, optimizer, scheduler, schedule: Schedule, batches: int) -> Progress:
        """Where training starts: step 0, our state, a kohya state, or --initial_step."""
        progress = self._restore(trainable, optimizer, scheduler, batches)
        if self.cfg.initial_step is not None or self.cfg.initial_epoch is not None:
            return self._start_at_initial_step(schedule, scheduler)
        if self.kohya_resume is not None:
            return self._restore_kohya(trainable, optimizer, scheduler, schedule)
        return progress

    def _checkpointer(self, acc, models: LoadedModels, group: DatasetGroup, trainable, optimizer,
                      scheduler, schedule: Schedule) -> Checkpointer:
        cfg = self.cfg
        meta = saving.base_metadata(cfg, self.what.metadata(self.family.metadata(models)), group, len(group),
                                    schedule.num_epochs, schedule.max_steps)
        run_info = {"seed": self.seed, "num_batches_per_epoch": len(group), "network": self.what.fingerprint(),
                    "log_dir": acc.project_dir if cfg.logging_dir else None}
        save = cfg.save
        if save.n_epoch_ratio:
            save = replace(save, every_n_epochs=saving.epochs_between_saves(schedule.num_epochs, save.n_epoch_ratio))
            logger.info("--save_n_epoch_ratio %d: saving every %d epoch(s)", save.n_epoch_ratio, save.every_n_epochs)
        return Checkpointer(save, trainable, optimizer, scheduler, meta, run_info, acc.is_main_process, self.what,
                            self.sharding)

    def _validator(self, acc, models: LoadedModels, group: DatasetGroup) -> Validator | None:
        if group.validation is None:
            return None
        validator = Validator(self.family, models, group.validation, self.seed, self.cfg.max_validation_steps, acc,
                              self._weight_dtype(), self._live_encoders(models))
        logger.info("validation: %d held-out image(s), %d batch(es) per pass", len(group.validation.items),
                    validator.batches)
        return validator


class _Stopped(Exception):
    """A signal asked the loop to stop after the step it finished."""


class _Loop:
    """The epoch/step loop with its saving, sampling and logging side effects."""

    def __init__(self, trainer: Trainer, acc, models, trainable, optimizer, scheduler, lr_names,
                 checkpointer: Checkpointer, validator: Validator | None = None,
                 fused: optim.FusedBackwardPass | None = None, residency: Residency | None = None):
        self.t, self.acc, self.models, self.trainable = trainer, acc, models, trainable
        self.residency = residency or Residency(acc.device)
        self.fused = fused
        self.validator = validator
        self.optimizer, self.scheduler, self.lr_names = optimizer, scheduler, lr_names
        self.checkpointer = checkpointer
        self.cfg = trainer.cfg
        self.family = trainer.family
        self.what = trainer.what
        self.live_encoders = trainer._live_encoders(models)
        self.params = trainable.trainable_params()
        # sharded weights get their gradients averaged in backward (FSDP's reduce-scatter)
        self.average_gradients = acc.num_processes > 1 and trainer.sharding is None
        # a sharded model's forward gathers each block from every process: all of them sample
        self.samples_everywhere = trainer.sharding is not None
        self.multiplier = 1.0
        self.key_norms: tuple[int, float, float] | None = None  # --scale_weight_norms: the last step's result
        self.stop = StopRequest()  # replaced by the active one while training

    def train(self, loader, schedule: Schedule, p: Progress) -> Path:
        """Run epochs from ``p`` (a fresh or restored position) until ``schedule.max_steps``."""
        cfg, acc = self.cfg, self.acc
        bar = tqdm(total=schedule.max_steps, initial=p.global_step, desc="steps", disable=not acc.is_local_main_process)
        optim.prepare_optimizer_for_training(self.optimizer)
        if cfg.sample.at_first and p.global_step == 0:
            self.sample(epoch=None, step=0)
        if p.batches_done >= schedule.batches_per_epoch:  # the state was saved at the end of an epoch
            p.epoch, p.batches_done, p.epoch_losses = p.epoch + 1, 0, []
        try:
            with StopRequest() as self.stop:
                for epoch in range(p.epoch, schedule.num_epochs):
                    if p.global_step >= schedule.max_steps:
                        break
                    if epoch != p.epoch:
                        p.epoch, p.batches_done, p.epoch_losses = epoch, 0, []
                    self._run_epoch(loader, schedule, p, bar)
                    self._end_epoch(schedule, p)
                    if p.global_step < schedule.max_steps and self._stop_requested():
                        raise _Stopped  # after the epoch's own saves, validation and samples
        except NonFiniteError as exc:
            bar.close()
            raise UserError(self._stop_non_finite(exc, p)) from exc
        except _Stopped:
            bar.close()
            raise Interrupted(self._save_on_stop(p), self.stop.exit_code) from None
        bar.close()
        final = self.checkpointer.on_train_end(p)
        acc.end_training()
        return final

    def _run_epoch(self, loader, schedule: Schedule, p: Progress, bar) -> None:
        cfg = self.cfg
        self.trainable.on_epoch_start(self.models.text_encoders, self.models.denoiser)
        loader.sampler.set_epoch(p.epoch, start=p.batches_done)
        accum, micro = cfg.gradient_accumulation_steps, []
        for i, batch in enumerate(loader, start=p.batches_done):
            # an optimizer step every `accum` batches, and at the end of the epoch
            sync = (i + 1) % accum == 0 or i + 1 == schedule.batches_per_epoch
            micro.append(self._step(batch, sync, p.global_step + 1))
            if not sync:
                continue
            loss, micro = sum(micro) / len(micro), []
            p.global_step, p.batches_done = p.global_step + 1, i + 1
            p.epoch_losses.append(loss)
            p.recent_losses = (p.recent_losses + [loss])[-schedule.batches_per_epoch:]
            average = sum(p.recent_losses) / len(p.recent_losses)
            bar.update(1)
            bar.set_postfix(avr_loss=f"{average:.4f}", **({"keys_scaled": self.key_norms[0],
                                                             "avg_key_norm": f"{self.key_norms[1]:.3f}"}
                                                            if self.key_norms else {}))
            self._log(p.global_step, loss, average)
            self.checkpointer.on_step(p, is_last=p.global_step >= schedule.max_steps)
            if self.validator and cfg.validate_every_n_steps and p.global_step % cfg.validate_every_n_steps == 0:
                self._validate(p, "step")
            every = cfg.sample.every_n_steps
            if every and not cfg.sample.every_n_epochs and p.global_step % every == 0:
                self.sample(epoch=None, step=p.global_step)
            if p.global_step >= schedule.max_steps:
                break
            if p.batches_done < schedule.batches_per_epoch and self._stop_requested():  # epoch end: see train()
                raise _Stopped

    def _validate(self, p: Progress, when: str) -> None:
        """Log kohya's loss/validation/<when>_average and _divergence (validation minus training)."""
        self._set_multiplier(1.0)
        with optim.optimizer_eval_mode(self.optimizer):
            value = self.validator.loss(self.trainable.net)
        train = (sum(p.recent_losses) / len(p.recent_losses)) if when == "step" and p.recent_losses else \
            (sum(p.epoch_losses) / len(p.epoch_losses) if p.epoch_losses else float("nan"))
        logger.info("validation loss at %s %d: %.5f (training %.5f)", when,
                    p.global_step if when == "step" else p.epoch + 1, value, train)
        if self.acc.is_main_process and self.cfg.trackers:
            x = p.global_step if when == "step" else p.epoch + 1
            self.acc.log({f"loss/validation/{when}_average": value,
                          f"loss/validation/{when}_divergence": value - train}, step=x)

    def _stop_requested(self) -> bool:
        """Whether a signal asked to stop, agreed by every process (each step, so they stop together)."""
        return not self._all_agree(self.stop.requested is None)

    def _save_on_stop(self, p: Progress) -> str:
        """The network and a resumable state at the step just finished; what to tell the user."""
        stem = saving.step_file_name(self.cfg.save.output_name, p.global_step, "")
        network = self.checkpointer.save_network(stem, p)
        state = self.checkpointer.save_state(stem, p)
        self.acc.end_training()
        return (f"{self.stop.requested or 'a signal'} after step {p.global_step}: saved {network} and the state "
                f"{state}; continue with --resume {state}")

    def _all_agree(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every process (so that all of them stop together, or none)."""
        if self.acc.num_processes == 1:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0], device=self.acc.device)
        return bool(self.acc.reduce(flag, reduction="sum").item() == 0)

    def _stop_non_finite(self, exc: NonFiniteError, p: Progress) -> str:
        """Keep the weights of the last completed step (they are still finite: the bad step was not
        applied), then explain. Weights that are not finite are never written."""
        local = (t.to_local() if hasattr(t, "to_local") else t for t in self.trainable.net.state_dict().values())
        finite = self._all_agree(all(bool(torch.isfinite(t).all()) for t in local))  # sharded: each its own part
        saved = ""
        if finite and p.global_step > 0:
            stem = saving.step_file_name(self.cfg.save.output_name, p.global_step, "")
            saved = f"; the weights after step {p.global_step} were saved as "
            saved += str(self.checkpointer.save_network(stem, p))
            if self.cfg.save.save_state:
                saved += f" (state: {self.checkpointer.save_state(stem, p)})"
        return (f"stopped at step {exc.step}: {exc.what}{saved}. Try a lower --learning_rate, "
                "--max_grad_norm 1.0, or --mixed_precision no / bf16 instead of fp16")

    def _end_epoch(self, schedule: Schedule, p: Progress) -> None:
        cfg, acc = self.cfg, self.acc
        if acc.is_main_process and cfg.trackers and p.epoch_losses:
            acc.log({"loss/epoch_average": sum(p.epoch_losses) / len(p.epoch_losses)}, step=p.epoch + 1)
        last = p.epoch + 1 == schedule.num_epochs or p.global_step >= schedule.max_steps
        every = cfg.validate_every_n_epochs or (None if cfg.validate_every_n_steps else 1)
        if self.validator and every and (p.epoch + 1) % every == 0:
            self._validate(p, "epoch")
        self.checkpointer.on_epoch_end(p, is_last=last)
        if cfg.sample.every_n_epochs and (p.epoch + 1) % cfg.sample.every_n_epochs == 0:
            self.sample(epoch=p.epoch + 1, step=p.global_step)

    def _step(self, batch: TrainBatch, sync: bool, step: int) -> float:
        """Forward and backward on one batch; an optimizer step too when ``sync``."""
        acc, family, models = self.acc, self.family, self.models
        self.trainable.on_step_start(models.text_encoders, models.denoiser)
        self._set_multiplier(batch.network_multiplier)
        dtype = self.t._weight_dtype()
        rng = SampleRNG(self.t.seed, batch.sample_keys, acc.device)
        latents = batch_latents(family, models, batch, acc.device, dtype, rng)
        cond = family.drop_conditioning(self._conditioning(batch, step), rng)
        noisy = make_noisy_batch(family, batch, latents, rng)
        self._preserve_outputs(batch, noisy, cond)
        with acc.autocast():
            pred = family.denoise(models, noisy, cond)
        loss = weighted_batch_loss(family.per_sample_loss(pred, noisy, batch.masks), batch.loss_weights)
        if not self._all_agree(bool(torch.isfinite(loss))):
            raise NonFiniteError(step, f"the loss became {loss.item()}" if not torch.isfinite(loss) else
                                 "another process's loss became non-finite")
        if loss.requires_grad:  # not when the network is off for this batch (network_multiplier 0)
            acc.backward(loss / self.cfg.gradient_accumulation_steps)
        if sync and self.fused:  # the optimizer already ran inside backward, tensor by tensor or part by part
            self.fused.finish()
            if bad := self.fused.take_non_finite():
                raise NonFiniteError(step, f"{len(bad)} gradient tensor(s) became non-finite (those were not "
                                           "applied; the others of this step were)")
            self.scheduler.step()
        elif sync:
            if self.average_gradients:
                _average_gradients(self.params, acc.device)
            max_norm = self.cfg.optimizer.max_grad_norm
            norm = acc.clip_grad_norm_(self.params, max_norm if max_norm > 0 else float("inf"))
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # sharded: the norm of all shards
            if norm is not None and not torch.isfinite(torch.as_tensor(norm)):
                raise NonFiniteError(step, f"the gradient norm became {float(norm)}")
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if sync and (norms := self.what.after_optimizer_step(self.trainable, acc.device, step)) is not None:
            self.key_norms = norms
        if acc.num_processes > 1:
            loss = acc.reduce(loss.detach(), reduction="mean")
        return loss.detach().item()

    def _conditioning(self, batch: TrainBatch, step: int):
        """The batch's text conditioning (see :func:`batch_conditioning`), with gradients through
        the text encoders while they train."""
        with torch.set_grad_enabled(self.what.trains_text_encoders_at(step)), self.acc.autocast():
            return batch_conditioning(self.family, self.models, batch, self.acc.device, self.t._weight_dtype(),
                                      self.live_encoders)

    def _preserve_outputs(self, batch: TrainBatch, noisy, cond) -> None:
        """diff_output_preservation (a subset's custom_attributes): for those samples the target is
        the base model's own output on the same input (network off), so the network learns to
        leave that subject (usually the class) as the base model draws it."""
        flags = [bool(a.get("diff_output_preservation")) for a in batch.custom_attributes]
        if not any(flags):
            return
        current = self.multiplier
        self._set_multiplier(0.0)
        with torch.no_grad(), self.acc.autocast():
            prior = self.family.target_from_prediction(self.family.denoise(self.models, noisy, cond), noisy)
        self._set_multiplier(current)
        rows = torch.tensor(flags, device=noisy.target.device).view(-1, *([1] * (noisy.target.ndim - 1)))
        noisy.target = torch.where(rows, prior.to(noisy.target.dtype), noisy.target)

    def _set_multiplier(self, value: float) -> None:
        """Datasets may train the network at another strength (kohya's network_multiplier)."""
        if value != self.multiplier:
            self.trainable.set_multiplier(value)
            self.multiplier = value

    def _log(self, step: int, loss: float, average: float) -> None:
        if not (self.acc.is_main_process and self.cfg.trackers):
            return
        logs = {"loss/current": loss, "loss/average": average}
        if self.key_norms:  # kohya's names
            logs.update({"max_norm/keys_scaled": self.key_norms[0], "norm/avg_key_norm": self.key_norms[1],
                         "max_norm/max_key_norm": self.key_norms[2]})
        for name, lr in zip(self.lr_names, self.scheduler.get_last_lr()):
            logs[f"lr/{name}"] = lr
        self.acc.log(logs, step=step)

    def sample(self, epoch: int | None, step: int) -> None:
        """Generate the sample prompts; the RNG state and training modes are restored afterwards."""
        prompts = self.cfg.sample.prompts
        if not prompts or not (self.acc.is_main_process or self.samples_everywhere):
            return
        torch_state, py_state = torch.get_rng_state(), random.getstate()
        self._set_multiplier(1.0)  # samples show the network at full strength
        was_training = self.trainable.net.training
        self.trainable.net.eval()
        try:
            with optim.optimizer_eval_mode(self.optimizer), self.what.sampling_weights(self.trainable), \
                    self.residency.for_sampling():
                for i, prompt in enumerate(prompts):
                    self._sample_one(i, prompt, epoch, step)
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(py_state)
            self.trainable.net.train(was_training)

    def _sample_one(self, index: int, prompt, epoch: int | None, step: int) -> None:
        seed = prompt.seed if prompt.seed is not None else random.randint(0, 2**31 - 1)
        if self.samples_everywhere:  # every process draws the same image
            seed = _same_on_all_processes(self.acc, seed)
        prompt = prompt.__class__(**{**prompt.__dict__, "seed": seed})
        with self.acc.autocast():  # modules may be in different dtypes (--no_half_vae)
            image = self.family.generate(self.models, prompt, prompt.sampler or self.cfg.sample.sampler,
                                         self.acc.device)
        if not self.acc.is_main_process:
            return
        path = saving.sample_file_name(self.cfg.save.output_dir, self.cfg.save.output_name, epoch, step, index, seed)
        _save_png(image, path, prompt)
        if self.cfg.trackers:
            self._log_image(image, index, step)

    def _log_image(self, image, index: int, step: int) -> None:
        """Sample images go to every tracker (TensorBoard and W&B both take lists of numpy images)."""
        array = np.asarray(image)
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({f"sample_{index}": array[None]}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({f"sample_{index}": [array]}, step=step)


def _save_png(image, path: Path, prompt) -> None:
    info = PngImagePlugin.PngInfo()
    params = (f"{prompt.prompt}\nNegative prompt: {prompt.negative_prompt}\nSteps: {prompt.steps}, "
              f"CFG scale: {prompt.scale}, Seed: {prompt.seed}, Size: {prompt.width}x{prompt.height}")
    info.add_text("parameters", params)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
