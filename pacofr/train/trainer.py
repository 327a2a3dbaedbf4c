"""The pre-training loop: AdamW + warm-up/cosine, accumulation, clipping, AMP, DDP, logging.

The model is any :class:`~pacofr.train.contract.PretrainingModel` (forward to losses, AdamW
groups, reconstructions, between-steps maintenance). The run folder's rules (lock, claiming,
overwrite) are :mod:`pacofr.train.run_folder`'s; what a checkpoint holds and how a run resumes
one is :mod:`pacofr.train.checkpointing`'s. Resuming continues the uninterrupted run exactly,
down to its scalars.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from pacofr.data.augment import Augment
from pacofr.data.batch_augment import BatchAugment, uint8_to_unit
from pacofr.data.encoded_items import encoded_items
from pacofr.data.loading import DeviceBatches, batch_pixels, default_num_workers
from pacofr.data.rank_shards import rank_shard_sampler
from pacofr.train.checkpointing import Resumable, TrainingCheckpoints, TrainState
from pacofr.train.config import PretrainConfig, dump_config
from pacofr.train.contract import PretrainingModel, StepMaintenance
from pacofr.train.distributed import DistInfo, all_reduce_mean, all_true, barrier
from pacofr.train.fields import ConfigError
from pacofr.train.metrics import ScalarCSV, TensorBoardLog, TensorMeans, peak_memory_mb
from pacofr.train.monitor import KnnMonitor
from pacofr.train.run_folder import (CONFIG_FILE, LOSS_CURVE_FILE, RECONSTRUCTIONS_FILE, SCALARS_FILE,
                                     TENSORBOARD_DIR, VIZ_DIR, RunFolder)
from pacofr.train.sampling import EpochSeededDataset, ResumableSampler
from pacofr.train.schedule import LRSchedule, cosine_ramp, scaled_lr
from pacofr.train.seeding import (AUGMENT_STREAM, LOADER_STREAM, MASK_STREAM, ORDER_STREAM, VIZ_STREAM,
                                  dataloader_worker_init, derive_seed, isolated_rng, make_generator,
                                  seed_everything)
from pacofr.train.stop_signals import StopSignals, TrainingStopped, leave_stop_signals_to_the_main_process

logger = logging.getLogger(__name__)

RegionFn = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


class NonFiniteLossError(RuntimeError):
    """A NaN/inf loss or gradient, after ``train.skip_nonfinite`` such batches were skipped."""

    exit_code = 1  # ``pacofr pretrain``'s exit status: the run stopped (the settings were accepted)


def _init_loader_worker(worker_id: int) -> None:
    """``worker_init_fn``: the worker's own python/numpy seeds; SIGINT and SIGTERM left to the main process."""
    dataloader_worker_init(worker_id)
    leave_stop_signals_to_the_main_process()


@dataclass
class TrainResult:
    """Where a finished run left its files (paths are None on ranks other than 0)."""

    out_dir: Path
    step: int
    checkpoint: Path | None
    scalars: Path | None
    loss_curve: Path | None
    reconstructions: Path | None


def _collate_first(dataset: Dataset, indices: list[int]) -> dict[str, torch.Tensor]:
    return torch.utils.data.default_collate([dataset[i] for i in indices])


class Trainer:
    """Runs :class:`PretrainConfig` ``cfg`` on ``model`` and ``dataset``.

    Args:
        cfg: the run's configuration.
        model: the (unwrapped) model, built identically on every rank.
        dataset: map-style dataset of ``{"image", "landmarks", "index"}`` items.
        dist_info: rank/world/device (``init_distributed()``); one CPU process when None.
        region_fn: batch -> (B, L) region ids; :class:`pacofr.train.regions.RegionAssigner` when None.
        recipe: the face-alignment recipe (``AlignmentRecipe.to_dict()``) recorded in checkpoints.
    """

    def __init__(self, cfg: PretrainConfig, model: PretrainingModel, dataset: Dataset, *,
                 dist_info: DistInfo | None = None, region_fn: RegionFn | None = None,
                 recipe: Mapping[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.tc = cfg.train
        self.dist = dist_info or DistInfo()
        self.device = self.dist.device
        self.out_dir = Path(self.tc.out_dir)
        self.run_folder = RunFolder(self.out_dir, self.dist)
        self.recipe = dict(recipe or {})
        if region_fn is None:
            from pacofr.train.regions import RegionAssigner

            region_fn = RegionAssigner(cfg.model)
        self.region_fn = region_fn
        self.state = TrainState()
        self._check_backend(cfg.model.backend, self.device)

        seed_everything(self.tc.seed, self.dist.rank)
        self.mask_generator = make_generator(derive_seed(self.tc.seed, MASK_STREAM, self.dist.rank), self.device)

        self.model = model.to(self.device)
        self.maintenance: StepMaintenance = model.step_maintenance()
        self.train_model: nn.Module = self.model  # what the forward runs: DDP and/or compiled wrappers
        if self.dist.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.train_model, device_ids=device_ids,
                                                       find_unused_parameters=self.tc.ddp_find_unused)
        if self.tc.compile:  # compiling the DDP wrapper lets DDP split the graph at its buckets
            self.train_model = torch.compile(self.train_model)  # type: ignore[assignment]

        if cfg.data.decode_on_device:  # items carry JPEG bytes, DeviceBatches decodes each batch
            try:
                dataset = encoded_items(dataset)
            except ValueError as err:
                raise ConfigError(f"data.decode_on_device=true: {err}") from err
        self.dataset = EpochSeededDataset(dataset, derive_seed(self.tc.seed, AUGMENT_STREAM))
        # uint8 batches are augmented on the device (a float batch comes augmented by its dataset)
        self.batch_augment = (BatchAugment(Augment(), seed=derive_seed(self.tc.seed, AUGMENT_STREAM, self.dist.rank))
                              if cfg.data.augment else None)
        order_seed = derive_seed(self.tc.seed, ORDER_STREAM)
        self.sampler = (rank_shard_sampler(dataset, self.dist.world_size, self.dist.rank, order_seed)
                        or ResumableSampler(self.dataset, self.dist.world_size, self.dist.rank, seed=order_seed))
        self.batches_per_epoch = (self.sampler.num_samples // self.tc.batch_size) // self.tc.accum_steps \
            * self.tc.accum_steps
        if self.batches_per_epoch == 0:
            raise ConfigError(f"the data set has {len(dataset)} images: too few for one optimiser step of "
                              f"train.batch_size={self.tc.batch_size} x train.accum_steps={self.tc.accum_steps} "
                              f"x {self.dist.world_size} process(es); lower train.batch_size")
        self.steps_per_epoch = self.batches_per_epoch // self.tc.accum_steps
        self.total_steps = self.tc.total_steps or self.steps_per_epoch * self.tc.epochs
        self.effective_batch = self.tc.batch_size * self.tc.accum_steps * self.dist.world_size
        self.schedule = LRSchedule(peak_lr=scaled_lr(self.tc.base_lr, self.effective_batch),
                                   total_steps=self.total_steps,
                                   warmup_steps=min(self.total_steps, round(self.tc.warmup_epochs * self.steps_per_epoch)),
                                   min_lr=self.tc.min_lr)
        if self.tc.min_lr > self.schedule.peak_lr:
            raise ConfigError(f"train.min_lr={self.tc.min_lr} exceeds the peak learning rate {self.schedule.peak_lr:.3g} "
                              f"(train.base_lr={self.tc.base_lr} x effective batch {self.effective_batch} / 256): "
                              "the schedule would rise instead of decaying")
        self.optimizer = torch.optim.AdamW(self.model.param_groups(self.tc.weight_decay),
                                           lr=self.schedule.peak_lr, betas=self.tc.betas)
        self.autocast_dtype = self._autocast_dtype()
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.means = TensorMeans()
        geometry = {"batch_size": self.tc.batch_size, "accum_steps": self.tc.accum_steps,
                    "world_size": self.dist.world_size, "samples_per_rank": self.sampler.num_samples}
        self.checkpoints = TrainingCheckpoints(
            self.run_folder.checkpoints,
            Resumable(self.model, self.optimizer, self.schedule, self.scaler, self.mask_generator, self.means,
                      geometry, self.tc.seed, self.device, self.batch_augment),
            self.dist, {"config": cfg.to_dict(), "alignment_recipe": self.recipe}, keep_last=self.tc.keep_last)

        self.monitor = self._build_monitor()
        self.scalars: ScalarCSV | None = None  # opened by fit() once the output folder is claimed
        self.tensorboard: TensorBoardLog | None = None
        self._viz_batch: dict[str, torch.Tensor] | None = None
        self._new_skipped_images = 0  # since the last log row (this rank)

    # ------------------------------------------------------------------------------------------ set-up
    @staticmethod
    def _check_backend(backend: str, device: torch.device) -> None:
        """Refuse a ``model.backend`` that cannot run on ``device`` before any work is done."""
        from pacofr.ops import backend_status

        if backend == "auto":
            return
        available, why = backend_status(backend, device)
        if not available:
            raise ConfigError(f"model.backend={backend!r} cannot run on {device}: {why}; use model.backend=auto "
                              "(the fastest available) or torch")

    def _build_monitor(self) -> KnnMonitor | None:
        """The k-NN monitor of ``train.monitor_*`` (built on rank 0; None when off and on other ranks).
        Its data is read here, so a bad ``train.monitor_data`` stops every rank before any work."""
        if not self.tc.monitor_every:
            return None
        if not self.tc.monitor_data.strip():
            raise ConfigError(f"train.monitor_every={self.tc.monitor_every} needs train.monitor_data: a labelled set "
                              "with class labels (a class-per-folder tree, a CSV or npz file, or proxy:NAME)")
        if not self.tc.log_every or self.tc.monitor_every % self.tc.log_every:
            raise ConfigError(f"train.monitor_every={self.tc.monitor_every} must be a multiple of train.log_every="
                              f"{self.tc.log_every} (the probe is logged with the scalars row of its step)")
        if not isinstance(getattr(self.model, "encoder", None), nn.Module):
            raise ConfigError(f"train.monitor_every={self.tc.monitor_every}: the model "
                              f"{type(self.model).__name__} has no encoder module to probe")
        monitor, error = None, None
        if self.dist.is_main:
            mc = self.cfg.model
            try:
                monitor = KnnMonitor(self.tc.monitor_data, k=self.tc.monitor_k, max_images=self.tc.monitor_max_images,
                                     pool=self.tc.monitor_pool, img_size=mc.img_size, mean=mc.pixel_mean,
                                     std=mc.pixel_std, batch_size=self.tc.batch_size)
            except Exception as err:  # noqa: BLE001 -- re-raised below, once the other ranks know (no hang)
                error = err
        if not all_true(error is None, self.dist):
            raise error or ConfigError(f"train.monitor_data={self.tc.monitor_data!r} could not be read (rank 0 "
                                       "names why)")
        return monitor

    def _monitor_scalars(self, last: bool) -> dict[str, float]:
        """The k-NN monitor's scalars when this step is one of its steps (or the last), else {}."""
        if self.monitor is None or not (self._every(self.tc.monitor_every) or last):
            return {}
        return self.monitor(self.model.encoder)  # type: ignore[attr-defined]

    def _autocast_dtype(self) -> torch.dtype | None:
        if self.tc.precision == "fp32":
            return None
        if self.device.type != "cuda":
            logger.info("train.precision=%s applies on CUDA only; the CPU runs in fp32", self.tc.precision)
            return None
        return torch.bfloat16 if self.tc.precision == "bf16" else torch.float16

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)

    def _loader(self, epoch: int, start_batch: int) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches ``start_batch ..`` of epoch ``epoch`` (order fixed by seed and epoch), on the
        device as float images in [0, 1], the next one already on its way (:class:`DeviceBatches`)."""
        self.dataset.epoch = epoch
        self.sampler.set_position(epoch, start_batch * self.tc.batch_size)
        generator = torch.Generator().manual_seed(derive_seed(self.tc.seed, LOADER_STREAM, self.dist.rank, epoch))
        workers = self.cfg.data.num_workers
        loader = DataLoader(self.dataset, batch_size=self.tc.batch_size, sampler=self.sampler,
                            num_workers=workers if workers >= 0 else default_num_workers(self.device.type),
                            drop_last=True, pin_memory=self.cfg.data.pin_memory and self.device.type == "cuda",
                            worker_init_fn=_init_loader_worker, generator=generator)
        batches = itertools.islice(iter(loader), self.batches_per_epoch - start_batch)
        return iter(DeviceBatches(batches, self.device, self.batch_augment))

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current state (rank 0 writes; every rank must call it)."""
        bad = [name for name, p in self.model.state_dict().items()
               if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:  # identical on every rank (DDP keeps the replicas equal), so all ranks stop together
            raise NonFiniteLossError(f"refusing to write a checkpoint at step {self.state.step}: "
                                     f"non-finite values in {bad[:5]}")
        self._count_skipped_images()
        return self.checkpoints.save(self.state)

    def load_checkpoint(self, path: str | Path) -> None:
        """Continue from checkpoint ``path`` (see :meth:`TrainingCheckpoints.resume`); the run folder
        abandons its later checkpoints and scalars rows."""
        self.state, folder = self.checkpoints.resume(path)
        self.run_folder.abandon_checkpoints_after(self.state.step)
        if self.scalars is not None:
            self.scalars.truncate_after(self.state.step)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", folder, self.state.step,
                    self.state.epoch, self.state.batch_in_epoch)

    # ------------------------------------------------------------------------------------------ loop
    def _forward_backward(self, batch: Mapping[str, torch.Tensor], incubation: bool, sync: bool) -> torch.Tensor:
        """One micro-batch: forward, backward of loss / accum_steps; returns the detached loss."""
        images = batch["image"].to(self.device, non_blocking=True)
        region_ids = self.region_fn(batch).to(self.device, non_blocking=True)
        no_sync = self.train_model.no_sync() if (self.dist.distributed and not sync) else contextlib.nullcontext()
        with no_sync:
            with self._autocast():
                out = self.train_model(images, region_ids, incubation=incubation, generator=self.mask_generator)
            loss = out.loss.float()
            scaled = loss / self.tc.accum_steps
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        terms = {f"loss/{k}": v for k, v in out.losses.items()}
        stats = {f"stat/{k}": v for k, v in out.stats.items()}
        self._last_terms = {"loss": loss.detach(), **terms}
        self.means.add({"loss": loss.detach(), **terms, **stats})
        self.maintenance.record(out)
        return loss.detach()

    def _handle_nonfinite(self, what: str, terms: Mapping[str, torch.Tensor]) -> None:
        """Skip the current optimiser step, or stop once ``skip_nonfinite`` steps were skipped."""
        terms_text = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
        message = (f"non-finite {what} at optimiser step {self.state.step} (epoch {self.state.epoch}); "
                   f"loss terms: {terms_text}")
        self.optimizer.zero_grad(set_to_none=True)
        self.maintenance.discard()
        if self.state.skipped_nonfinite >= self.tc.skip_nonfinite:
            raise NonFiniteLossError(f"{message}; stopping (train.skip_nonfinite={self.tc.skip_nonfinite} "
                                     f"batches already skipped). The last checkpoint is untouched.")
        self.state.skipped_nonfinite += 1
        logger.warning("%s; skipping this step (%d of at most %d)", message, self.state.skipped_nonfinite,
                       self.tc.skip_nonfinite)

    def _optimizer_step(self, bad_terms: Mapping[str, torch.Tensor] | None) -> tuple[float, float] | None:
        """Clip, step, the model's between-steps maintenance. Returns (lr, grad norm), or None if the step was skipped.

        ``bad_terms``: the loss terms of a micro-batch of this step whose loss was not finite.
        """
        if bad_terms is not None:
            self._handle_nonfinite("loss", bad_terms)
            return None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.tc.clip_grad if self.tc.clip_grad > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if self.scaler is None and not all_true(bool(torch.isfinite(grad_norm)), self.dist):
            self._handle_nonfinite(f"gradient (norm {grad_norm.item():.4g})", self._last_terms)
            return None
        lr = self.schedule.apply(self.optimizer, self.state.step)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        momentum = cosine_ramp(self.state.step, self.total_steps, self.cfg.model.teacher_momentum,
                               self.cfg.model.teacher_momentum_end)
        report = self.maintenance.apply(teacher_momentum=momentum)
        self.means.add({f"stat/{k}": torch.tensor(float(v), device=self.device) for k, v in report.items()})
        return lr, float(grad_norm)

    def _count_skipped_images(self) -> None:
        """Add the unreadable images all ranks met since the last call to the state (collective)."""
        new = torch.tensor(float(self._new_skipped_images), device=self.device)
        if self.dist.distributed:
            new = all_reduce_mean(new, self.dist) * self.dist.world_size
        self._new_skipped_images = 0
        if round(float(new)) > 0:
            self.state.skipped_images += round(float(new))
            logger.warning("%d unreadable image(s) skipped so far (each replaced by the next readable one; "
                           "the dataset's warnings name them)", self.state.skipped_images)

    def _log(self, lr: float, grad_norm: float, images_per_s: float, keep_means: bool = False,
             extra: Mapping[str, float] | None = None) -> dict[str, float]:
        """Append a scalars row (with ``extra``, e.g. the monitor's scalars). ``keep_means``: the means
        since the last row go on accumulating (a row off the ``log_every`` grid, so that the next row
        on it covers the same steps as in a run that was never stopped)."""
        reduce = (lambda t: all_reduce_mean(t, self.dist)) if self.dist.distributed else None
        row: dict[str, Any] = {"step": self.state.step, "epoch": self.state.epoch}
        row.update(self.means.peek(reduce) if keep_means else self.means.pop(reduce))
        self._count_skipped_images()
        row.update({"lr": lr, "grad_norm": grad_norm, "images_per_s": images_per_s,
                    "peak_mem_mb": peak_memory_mb(self.device),
                    "skipped_nonfinite": self.state.skipped_nonfinite,
                    "skipped_images": self.state.skipped_images, **(extra or {})})
        if self.scalars is not None:
            self.scalars.append(row)
        if self.tensorboard is not None:
            self.tensorboard.log(row, self.state.step)
        return row

    def _viz_inputs(self) -> dict[str, torch.Tensor]:
        if self._viz_batch is None:
            n = len(self.dataset.dataset)  # type: ignore[arg-type]
            count = min(self.tc.num_viz, n)
            indices = [int(i) for i in np.linspace(0, n - 1, count).round()]
            with isolated_rng(derive_seed(self.tc.seed, VIZ_STREAM), include_cuda=False):
                batch = _collate_first(self.dataset.dataset, indices)
            self._viz_batch = {**batch, "image": batch_pixels(batch["image"], "cpu")}  # JPEG bytes decoded
        return self._viz_batch

    def save_reconstructions(self) -> Path | None:
        """Reconstruct the fixed visualisation faces; write ``viz/step_XXXXXXXX.png`` and the latest
        as ``reconstructions.png`` (rank 0; the training RNG streams are not touched)."""
        if not self.dist.is_main or self.tc.num_viz == 0:
            return None
        from pacofr.viz import GRID_ROWS, save_reconstruction_grid

        batch = self._viz_inputs()
        images = uint8_to_unit(batch["image"].to(self.device))
        region_ids = self.region_fn(batch).to(self.device)
        was_training = self.model.training
        self.model.eval()
        with isolated_rng(), torch.no_grad(), self._autocast():
            generator = make_generator(derive_seed(self.tc.seed, VIZ_STREAM, 1), self.device)
            panels = self.model.reconstruct(images, region_ids, generator=generator)
        self.model.train(was_training)
        panels = {k: v.float().cpu() for k, v in panels.items()}
        step_png = save_reconstruction_grid(panels, self.out_dir / VIZ_DIR / f"step_{self.state.step:08d}.png",
                                            rows=getattr(self.model, "panel_rows", GRID_ROWS))
        latest = self.out_dir / RECONSTRUCTIONS_FILE
        latest.write_bytes(step_png.read_bytes())
        return latest

    def _every(self, n: int) -> bool:
        return n > 0 and self.state.step % n == 0

    def fit(self, resume_from: str | Path | None = None, overwrite: bool = False) -> TrainResult:
        """Train until ``train.epochs`` (or ``train.max_steps``) are done; return the output paths.

        ``resume_from``: a checkpoint (or checkpoints / run folder) to continue exactly.
        ``overwrite``: a fresh run may delete an earlier run's files in ``out_dir``.
        Raises :class:`RunFolderLockedError` (on every rank) when another run holds ``out_dir``, and
        :class:`TrainingStopped` after checkpointing the step in flight when SIGINT or SIGTERM arrives
        (:mod:`pacofr.train.stop_signals`).
        """
        with self.run_folder.locked(), StopSignals() as stop:
            return self._fit(resume_from, overwrite, stop)

    def _fit(self, resume_from: str | Path | None, overwrite: bool, stop: StopSignals) -> TrainResult:
        self.run_folder.claim(fresh=resume_from is None, overwrite=overwrite)
        if self.dist.is_main:
            (self.out_dir / CONFIG_FILE).write_text(dump_config(self.cfg))
            self.scalars = ScalarCSV(self.out_dir / SCALARS_FILE)
            self.tensorboard = TensorBoardLog(self.out_dir / TENSORBOARD_DIR, self.tc.tensorboard)
        barrier(self.dist)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        stop_step = min(self.total_steps, self.tc.max_steps) if self.tc.max_steps else self.total_steps
        logger.info("training %d steps (%d per epoch, effective batch %d, peak lr %.3g, warm-up %d steps) "
                    "from step %d on %s x %d", self.total_steps, self.steps_per_epoch, self.effective_batch,
                    self.schedule.peak_lr, self.schedule.warmup_steps, self.state.step, self.device,
                    self.dist.world_size)
        progress = _progress_bar(stop_step, self.state.step, self.dist.is_main and self.tc.progress)
        last_checkpoint: Path | None = None
        saved_step = -1
        self.model.train()
        interval_start, interval_images = time.perf_counter(), 0
        lr, grad_norm = self.schedule.lr_at(self.state.step), math.nan
        while self.state.step < stop_step:
            epoch = self.state.epoch
            incubation = epoch < self.tc.incubation_epochs
            bad_terms, in_window = None, 0
            for batch in self._loader(epoch, self.state.batch_in_epoch):
                in_window += 1
                loss = self._forward_backward(batch, incubation, sync=in_window == self.tc.accum_steps)
                if not all_true(bool(torch.isfinite(loss)), self.dist) and bad_terms is None:
                    bad_terms = self._last_terms
                interval_images += batch["image"].shape[0] * self.dist.world_size
                if "substituted" in batch:
                    self._new_skipped_images += int(batch["substituted"].sum())
                self.state.batch_in_epoch += 1
                if in_window < self.tc.accum_steps:
                    continue
                result = self._optimizer_step(bad_terms)
                if result is not None:
                    lr, grad_norm = result
                self.state.step += 1
                bad_terms, in_window = None, 0
                if self.state.batch_in_epoch == self.batches_per_epoch:
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
                last = self.state.step >= stop_step
                on_grid = self._every(self.tc.log_every)
                if on_grid or last:
                    elapsed = time.perf_counter() - interval_start
                    row = self._log(lr, grad_norm, interval_images / max(elapsed, 1e-9), keep_means=not on_grid,
                                    extra=self._monitor_scalars(last))
                    interval_start, interval_images = time.perf_counter(), 0
                    progress.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}",
                                         lr=f"{lr:.2e}", refresh=False)
                progress.update(1)
                pause_start = time.perf_counter()
                if self._every(self.tc.viz_every) and not last:
                    self.save_reconstructions()
                if self._every(self.tc.ckpt_every) or last:
                    last_checkpoint = self.save_checkpoint()
                    saved_step = self.state.step
                interval_start += time.perf_counter() - pause_start  # images/s counts training time only
                if not last and not all_true(stop.received is None, self.dist):  # every rank stops at this step
                    raise self._stop(stop, progress, last_checkpoint, saved=saved_step == self.state.step)
                if last or self.state.batch_in_epoch == 0:
                    break
        progress.close()
        if saved_step != self.state.step:
            last_checkpoint = self.save_checkpoint()
        return self._finish(last_checkpoint)

    def _stop(self, stop: StopSignals, progress: Any, checkpoint: Path | None, saved: bool) -> TrainingStopped:
        """After the step a stop signal arrived in: checkpoint it (every rank, unless ``saved``: ``checkpoint``
        already holds this step), close the logs, and return the error that ends the run. A rank that saw no
        signal itself (another rank did) reports SIGTERM."""
        progress.close()
        signum = stop.received or signal.SIGTERM
        logger.warning("%s received: stopping after step %d with a checkpoint", signal.Signals(signum).name,
                       self.state.step)
        if not saved:
            checkpoint = self.save_checkpoint()
        if self.tensorboard is not None:
            self.tensorboard.close()
        return TrainingStopped(signum, self.state.step, checkpoint, self.out_dir)

    def _finish(self, last_checkpoint: Path | None) -> TrainResult:
        result = TrainResult(self.out_dir, self.state.step, last_checkpoint, None, None, None)
        if self.dist.is_main:
            from pacofr.viz import save_loss_curve

            result.scalars = self.out_dir / SCALARS_FILE
            if result.scalars.exists():
                incubation_steps = self.steps_per_epoch * self.tc.incubation_epochs if self.cfg.model.is_paco else 0
                result.loss_curve = save_loss_curve(result.scalars, self.out_dir / LOSS_CURVE_FILE,
                                                    incubation_steps=incubation_steps)
            result.reconstructions = self.save_reconstructions()
            if self.tensorboard is not None:
                self.tensorboard.close()
        barrier(self.dist)
        return result


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """tqdm bar over optimiser steps (ETA from the remaining steps); a stand-in when disabled."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                desc="pretrain")
