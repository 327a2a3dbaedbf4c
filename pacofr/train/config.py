"""Pre-training configuration: ``PretrainConfig(model, data, train)``, YAML presets, ``--set`` overrides.

A YAML config has the sections ``model``, ``data`` and ``train``. In ``model`` the key
``preset`` (one of :meth:`ModelConfig.preset_names`) picks the base model config that the other
keys then override. Named presets live in ``pacofr/configs/<name>.yaml``.

Every problem with a config is a one-line :class:`ConfigError` that names where the value came
from (the file or preset, or the ``--set`` item), the key and what was expected. A key written
twice in one mapping of a YAML file is refused (YAML itself would keep the last silently).
"""

from __future__ import annotations

import collections.abc
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from pacofr.data.regions import NUM_REGIONS
from pacofr.eval.choices import POOLS
from pacofr.models.config import ModelConfig
from pacofr.train.fields import ConfigError, from_dict, merge_into, set_by_path, to_dict

Precision = Literal["bf16", "fp16", "fp32"]
DataLayout = Literal["prepared", "crops"]
Device = Literal["auto", "cpu", "cuda"]


@dataclass
class DataConfig:
    """Where the aligned face crops come from and how they are loaded.

    ``root``: ``"demo"`` for the embedded real-face demo set, else a folder of aligned crops
    (``pacofr.data.datasets.AlignedFaceDataset``). Images are resized to ``model.img_size``.
    ``layout``: ``"prepared"``, a folder written by ``pacofr prepare``; ``"crops"``, images that
    are already face crops (a folder, ``.zip`` or ``.npz``), used as they are with the template
    region map (``pacofr.data.datasets.CroppedFaceDataset``).
    """

    root: str = "demo"
    layout: DataLayout = "prepared"
    augment: bool = True  # flip (with left/right landmark swap), small similarity and colour jitter,
    #                       drawn per image and applied to the whole batch on the training device
    num_workers: int = -1  # loader processes; -1: the cores this process may use, less one, shared by
    #                        the ranks on this host, on CUDA; 0 (load in the training process) on the CPU
    pin_memory: bool = True  # only takes effect on CUDA
    decode_on_device: bool = False  # the loader reads each crop's JPEG bytes and the batch is decoded where
    #                                 the step runs (nvJPEG on CUDA, libjpeg-turbo on the CPU): data.layout=prepared
    #                                 with crops at model.img_size (pacofr.data.encoded_items)

    def __post_init__(self) -> None:
        if self.num_workers < -1:
            raise ValueError(f"num_workers must be >= 0, or -1 for the default, got {self.num_workers}")
        most = max_data_workers()
        if self.num_workers > most:
            raise ValueError(f"num_workers={self.num_workers} is more than {most} (4 per CPU core of the "
                             f"{os.cpu_count() or 1} here): each worker is a process decoding images")


def max_data_workers() -> int:
    """Most ``data.num_workers`` accepted: 4 per CPU core (at least 8). More loader processes than
    that only compete for the cores, and tens of thousands never start (each is a process)."""
    return max(8, 4 * (os.cpu_count() or 1))


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision, logging and checkpointing of one pre-training run.

    ``batch_size`` is per process and micro-batch; the effective batch is
    ``batch_size * accum_steps * world_size`` and the peak lr ``base_lr * effective / 256``.
    Step counts (``log_every`` ...) are optimiser steps; 0 switches the periodic action off
    (a final checkpoint and reconstruction grid are still written).
    """

    out_dir: str = "runs/pretrain"
    epochs: int = 100
    max_steps: int = 0  # stop after this many optimiser steps (0: run all epochs); the schedule
    #                     still spans all epochs, so a run can be cut short and resumed exactly
    total_steps: int = 0  # length of the run and of its lr schedule in optimiser steps, whatever
    #                       the epochs (0: epochs x steps per epoch); e.g. a compute budget in steps
    batch_size: int = 64
    accum_steps: int = 1
    base_lr: float = 1.5e-4
    min_lr: float = 0.0
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 3.0  # max global grad norm; 0: no clipping (the norm is still logged)
    precision: Precision = "bf16"  # autocast dtype on CUDA; the CPU always runs fp32
    compile: bool = False  # torch.compile the model
    device: Device = "auto"
    seed: int = 0
    incubation_epochs: int = 1  # epochs [0, incubation_epochs) run the incubation stage
    skip_nonfinite: int = 0  # batches with a NaN/inf loss or gradient skipped before stopping
    ddp_find_unused: bool = True  # DDP find_unused_parameters (parts of the model switch on/off)
    log_every: int = 10
    viz_every: int = 500
    num_viz: int = 8  # faces in the reconstruction grid
    ckpt_every: int = 1000
    keep_last: int = 3
    progress: bool = True  # tqdm progress bar (rank 0)
    tensorboard: bool = False  # also log scalars to TensorBoard when it is installed
    # online monitoring (pacofr.train.monitor): a k-NN probe of the encoder on a small labelled set,
    # logged as monitor/knn_acc and monitor/majority with the scalars row of its step (rank 0)
    monitor_every: int = 0  # optimiser steps between probes, a multiple of log_every (0: off)
    monitor_data: str = ""  # a labelled set as `pacofr eval --data` takes it, class labels (folder, CSV, proxy:NAME)
    monitor_k: int = 20  # neighbours that vote
    monitor_max_images: int = 500  # the most images taken from each of its train and test splits
    monitor_pool: str = "mean"  # feature pool: cls, mean, cls+mean or tokens

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        for name in ("epochs", "batch_size", "accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "total_steps", "incubation_epochs", "skip_nonfinite", "log_every", "viz_every",
                     "num_viz", "ckpt_every", "keep_last"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("base_lr", "min_lr", "warmup_epochs", "weight_decay", "clip_grad"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if self.min_lr > self.base_lr:
            raise ValueError(f"min_lr={self.min_lr} must not exceed base_lr={self.base_lr} (the schedule decays "
                             "from base_lr down to min_lr)")
        if not self.out_dir.strip():
            raise ValueError("out_dir must name a folder, got an empty string")
        self._check_monitor()

    def _check_monitor(self) -> None:
        """Each monitor field on its own (the trainer checks how they fit together, once every
        ``--set`` item is applied: monitor_data given, monitor_every a multiple of log_every)."""
        if self.monitor_every < 0:
            raise ValueError(f"monitor_every must be >= 0, got {self.monitor_every}")
        for name in ("monitor_k", "monitor_max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.monitor_pool not in POOLS:
            raise ValueError(f"monitor_pool must be one of {POOLS}, got {self.monitor_pool!r}")


@dataclass
class PretrainConfig:
    """The whole run: ``model`` (:class:`ModelConfig`), ``data``, ``train``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.model.num_regions < NUM_REGIONS:
            raise ConfigError(f"model.num_regions={self.model.num_regions}: the data pipeline labels every patch "
                              f"with one of {NUM_REGIONS} facial regions (pacofr.data.regions), so it must be "
                              f">= {NUM_REGIONS}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, numbers, strings) for YAML, JSON and checkpoints."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainConfig:
        """Inverse of :meth:`to_dict`; also accepts ``model.preset`` (see module docs)."""
        return _build(data)


def preset_names() -> list[str]:
    """Names of the packaged YAML configs (``pacofr/configs/*.yaml``)."""
    folder = resources.files("pacofr") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping holding one key twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, collections.abc.Hashable) and key in seen:
                raise ConfigError(f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line}); "
                                  "keep one (YAML would silently use the last)")
            if isinstance(key, collections.abc.Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, source: str) -> dict[str, Any]:
    """The sections of config text; ``source`` (``config FILE``) starts every error message."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except yaml.constructor.ConstructorError as err:
        raise ConfigError(f"{source}: {err.problem} (only plain YAML values are allowed: no tags that build "
                          f"Python objects){_where(err)}") from None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source} is not valid YAML: {problem}{_where(err)}") from None
    if data is None:
        raise ConfigError(f"{source} is empty: expected a mapping with model, data and train sections "
                          "(e.g. model: {preset: vit_small})")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with model, data and train sections, got {data!r:.60}")
    for section, value in data.items():
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of keys, got {value!r:.60}")
    return data


def _where(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _read_yaml(name_or_path: str | Path) -> tuple[dict[str, Any], str]:
    """The sections of a config file or packaged preset, and its name for error messages."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        source = f"config {path}"
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{source} is not a UTF-8 text file (a YAML config is text)") from None
        except OSError as err:
            raise ConfigError(f"{source} cannot be read ({err.strerror or err})") from None
    else:
        source = f"preset {name_or_path}"
        packaged = resources.files("pacofr") / "configs" / f"{name_or_path}.yaml"
        if not packaged.is_file():
            raise ConfigError(f"unknown config {str(name_or_path)!r}: not a file, and not a packaged "
                              f"preset (presets: {preset_names()})")
        text = packaged.read_text()
    return _parse_yaml(text, source), source


def _build(data: dict[str, Any]) -> PretrainConfig:
    unknown = sorted(set(data) - {"model", "data", "train"})
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; valid sections: ['data', 'model', 'train']")
    model_data = dict(data.get("model") or {})
    preset = model_data.pop("preset", None)
    if preset is not None:
        try:
            base_model = ModelConfig.preset(str(preset))
        except ValueError as err:
            raise ConfigError(f"model.preset: {err}") from err
    else:
        base_model = ModelConfig()
    model = merge_into(base_model, model_data, prefix="model")
    cfg = PretrainConfig(model=model,
                         data=from_dict(DataConfig, data.get("data") or {}, prefix="data"),
                         train=from_dict(TrainConfig, data.get("train") or {}, prefix="train"))
    return cfg


def parse_override(item: str) -> tuple[str, str]:
    """Split ``"a.b=value"`` into ``("a.b", "value")``."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"bad override {item!r}: expected KEY=VALUE, e.g. train.base_lr=1e-4")
    return key.strip(), value


def load_config(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """Read a packaged preset (``"demo"``) or a YAML file, then apply ``KEY=VALUE`` overrides in order.

    ``model.preset=NAME`` swaps the base model config before anything else; the file's other
    ``model`` keys and the remaining overrides still apply on top of it.
    """
    data, source = _read_yaml(name_or_path)
    parsed = [parse_override(item) for item in overrides]
    for key, value in parsed:
        if key == "model.preset":
            data["model"] = {**(data.get("model") or {}), "preset": value.strip()}
    try:
        cfg = _build(data)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return apply_overrides(cfg, [item for item, (key, _) in zip(overrides, parsed) if key != "model.preset"])


def apply_overrides(cfg: PretrainConfig, overrides: list[str] | tuple[str, ...]) -> PretrainConfig:
    """``cfg`` with ``KEY=VALUE`` items applied in order; an error names the ``--set`` item."""
    for item in overrides:
        try:
            cfg = set_by_path(cfg, *parse_override(item))
        except ConfigError as err:
            raise ConfigError(f"--set {item}: {err}") from None
    return cfg


def dump_config(cfg: PretrainConfig) -> str:
    """YAML text of ``cfg`` (every field, no preset indirection): reloads to an equal config."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
