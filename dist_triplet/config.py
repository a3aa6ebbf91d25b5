"""One typed configuration for a run: defaults here, a YAML file over them, then
``key.sub=value`` command-line overrides, then validation and freeze.

Every key is documented where it is declared, with its units and the source of its
default. Unknown keys, values that do not parse to the key's type, and values out of
range fail at start-up with a ``ConfigError`` that names the key (and the file, for
YAML). The resolved config is written beside the run's outputs (``config.yaml``).

Batch-size and learning-rate semantics (the same for every backend):

* ``train.batch_size`` is **per worker**: triplets one rank (Horovod) or one device
  (kvstore) processes per step. Global batch = world size x ``batch_size``.
* Each step's gradient is the mean over the global batch: ``Trainer.step(n)`` divides by
  the ``n`` triplets it is given, and Horovod's ``DistributedTrainer`` averages across
  ranks; the kvstore backend sums over devices and steps by the global batch.
* Hence the learning rate is the learning rate *of the global batch*. Changing the world
  size changes the global batch; ``optim.scale_lr: true`` then applies the linear
  scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD"):
  ``lr = optim.lr * global_batch / optim.base_batch``.
* P x K mining: each worker's loss is the mean over its mined triplets and the step
  averages the workers. With ``sampler.scope: global`` every worker's loss is the mean
  over the triplets mined in the *global* batch, its backward seeded with the world size,
  so the averaged update is one process's on the global batch (mining.py).

Resume policy: every field declares in its metadata what a resumed run may do with it
(``checkpoint.check_compatible`` reads it through :func:`resume_policies`; a test checks
that every field has one). New keys use the same form::

    name: int = field(default=0, metadata=FIXED)

* ``FIXED`` (``{"resume": "fixed"}``): must equal the checkpoint's value. The key changes
  the parameters' shapes, what a step computes, the optimizer state's meaning (momentum
  and wd are pickled with the optimizer in trainer.states, so a new value would be
  silently ignored), or which triplets each worker draws.
* ``SCHEDULE`` (``{"resume": "schedule"}``): may change. The learning rate of every step
  is recomputed from the current config (``schedule.learning_rate``), so lowering optim.lr
  after a divergence, or extending train.epochs, works. An info line names the changed
  keys; a warning (the run then differs from an uninterrupted one with the old values)
  follows only when a remaining step's learning rate differs (``train.read_resume_meta``).
* ``FREE`` (``{"resume": "free"}``): may change silently (evaluation, output, progress,
  devices: the world size itself is checked from the checkpoint's processes x devices).

Why not OmegaConf structured configs: OmegaConf is not installed in the project's
environment (it would be a new dependency), and what this module does by hand is small
and specific: error messages that name the file, line, key and value (``cfg.yaml: line 7:
train.epochs must be an integer, got 'two'``; the line for an unknown or mistyped key of a
YAML file, the key and value alone for a range or choice error), duplicate YAML keys refused (OmegaConf, like PyYAML,
keeps the last one), range and choice checks with the key in the message, and the typed
per-field resume policy above (dataclass metadata, which OmegaConf would carry too but
not use). Dotted overrides are the one feature both have. Revisit if the config grows
nested sections or interpolation.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple, Union

import yaml

from .fsutil import atomic_write


# Resume policies (see the module docstring), used as ``field(..., metadata=FIXED)``.
FIXED = {"resume": "fixed"}
SCHEDULE = {"resume": "schedule"}
FREE = {"resume": "free"}
RESUME_POLICIES = ("fixed", "schedule", "free")


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names it."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: plain YAML keeps the last
    one, so a second ``train:`` section would silently drop the first."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if first is not None:
                raise ConfigError(
                    f"{self.name}: line {key_node.start_mark.line + 1}: duplicate key {key!r} "
                    f"(first given on line {first}); merge the two into one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


@dataclass
class DataConfig:
    """Where the data come from and how they are split (section ``data``; docs/data.md)."""

    # Named MNIST-format data set, used when data.path is null: 'fashion_mnist' (Debian's
    # dataset-fashion-mnist), 'mnist' (MXNet downloads it when root is null and the network
    # allows) or 'idx' (any MNIST-format directory in root).
    dataset: str = field(default="fashion_mnist", metadata=FIXED)
    # Directory holding the four IDX files (gzip or raw); null = the data set's default place.
    root: Optional[str] = field(default=None, metadata=FREE)
    # Your own data: a file or directory (then data.dataset and data.root are not used).
    # Free on resume like data.root (the same data may move); which data it is, is yours.
    path: Optional[str] = field(default=None, metadata=FREE)
    # Format of data.path: 'auto' (from the name/content where unambiguous), 'idx' (a
    # directory of the four MNIST-format files, any rows x cols), 'npz' (x, y[, classes];
    # or a directory with train.npz[, test.npz]), 'folder' (ROOT/<class>/*.png|jpg, or
    # ROOT/train + ROOT/test), 'csv' (path,label[,split], the open-metric-learning layout).
    format: str = field(default="auto", metadata=FIXED)
    # Image files (folder, csv): Pillow mode 'L' (1 channel) or 'RGB' (3 channels).
    mode: str = field(default="RGB", metadata=FIXED)
    # Image files: resize every image to [H, W] (one int = square); null = all images must
    # share one size. Pillow's bilinear filter.
    image_size: Optional[List[int]] = field(default=None, metadata=FIXED)
    # Data without a test split: 'fraction' = stratified per class (data.test_fraction of
    # each class to test), or 'classes' = the last data.test_fraction of the classes are test
    # classes, never seen in training (CUB-200 / Cars196 / SOP protocol; 1-sample classes
    # become test queries). Also decides whether a 1-sample test class is allowed.
    split: str = field(default="fraction", metadata=FIXED)
    # In (0, 1): the share of each class (fraction), or of the classes (classes), to test.
    test_fraction: float = field(default=0.2, metadata=FIXED)
    # Seed of the stratified split; not train.seed, so a new run seed keeps the split.
    split_seed: int = field(default=0, metadata=FIXED)
    # Directory for the shared uint8 .npy cache: the first process of a host decodes the
    # data once, every process memory-maps it (one copy per host). null = each process
    # reads the data into its own memory (fine for small data such as Fashion-MNIST).
    cache_dir: Optional[str] = field(default=None, metadata=FREE)
    # Use only the first N training / test samples (0 = all). For debug runs and tests.
    limit_train: int = field(default=0, metadata=FIXED)
    limit_test: int = field(default=0, metadata=FREE)


@dataclass
class ModelConfig:
    """The embedding MLP (section ``model``)."""

    # Widths of the Dense layers; the last one is the embedding size D.
    # Seed article: Dense(256, relu) -> Dense(128, relu).
    hidden: List[int] = field(default_factory=lambda: [256, 128], metadata=FIXED)
    # ReLU after the last layer too, as the seed. Set false with normalize: true, so the
    # embedding can point anywhere on the sphere rather than in the positive orthant.
    final_relu: bool = field(default=True, metadata=FIXED)
    # L2-normalise embeddings (FaceNet, Schroff et al. 2015). Squared distances are then
    # in [0, 4], and the margin is in those units.
    normalize: bool = field(default=False, metadata=FIXED)
    # Uniform(-init_scale, init_scale) weight init, as the seed's mx.init.Uniform(0.1).
    init_scale: float = field(default=0.1, metadata=FREE)


@dataclass
class LossConfig:
    """The triplet loss (section ``loss``)."""

    # Triplet margin, in squared-L2 units as gluon.loss.TripletLoss:
    # loss = max(0, ||a-p||^2 - ||a-n||^2 + margin). Default 1: Gluon's default, used by the seed.
    margin: float = field(default=1.0, metadata=FIXED)


@dataclass
class SamplerConfig:
    """How triplets are drawn: offline create_pairs or P x K online mining (section ``sampler``)."""

    # 'offline': the seed's create_pairs triplets, made per rank each epoch (default).
    # 'pk': class-balanced batches of p classes x k samples with online mining.
    kind: str = field(default="offline", metadata=FIXED)
    p: int = field(default=16, metadata=FIXED)              # classes per P x K batch
    k: int = field(default=8, metadata=FIXED)               # samples per class in a P x K batch
    # Online miner for kind 'pk': 'batch_hard' (Hermans et al. 2017) or 'semi_hard' (FaceNet).
    miner: str = field(default="semi_hard", metadata=FIXED)
    # P x K batches per epoch per worker; 0 = as many as cover the training set once.
    steps_per_epoch: int = field(default=0, metadata=FIXED)
    # What the miner sees (kind 'pk'). 'local': each worker mines inside its own P x K
    # batch. 'global': all workers draw the same p classes (k images each), the embeddings
    # of every worker are gathered, and triplets are mined over the whole global batch of
    # workers x p x k; the update equals one process's on that batch (issue 13).
    scope: str = field(default="local", metadata=FIXED)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (section ``optim``)."""

    optimizer: str = field(default="sgd", metadata=FIXED)   # 'sgd' (seed) or 'adam'
    # Learning rate of the global batch (see the module docstring). Seed: 0.05.
    lr: float = field(default=0.05, metadata=SCHEDULE)
    momentum: float = field(default=0.0, metadata=FIXED)    # sgd only
    wd: float = field(default=0.0, metadata=FIXED)          # L2 weight decay
    # 'constant' (seed) or 'cosine' (decays per step to 0 over the run, after warm-up).
    schedule: str = field(default="constant", metadata=SCHEDULE)
    # Linear warm-up from 0, in epochs.
    warmup_epochs: float = field(default=0.0, metadata=SCHEDULE)
    # Linear scaling rule: lr * global_batch / base_batch (Goyal et al. 2017).
    scale_lr: bool = field(default=False, metadata=SCHEDULE)
    base_batch: int = field(default=256, metadata=SCHEDULE)


@dataclass
class TrainConfig:
    """Epochs, per-worker batch and run seed (section ``train``)."""

    epochs: int = field(default=10, metadata=SCHEDULE)         # seed: 10
    # Triplets per worker per step (offline sampler). Global batch = world size x batch_size.
    batch_size: int = field(default=256, metadata=FIXED)
    # Run seed: triplets are a function of (seed, epoch, rank); parameters init from it.
    seed: int = field(default=42, metadata=FIXED)
    # Progress bar on rank 0 (tqdm), shown only when stderr is a terminal (debug and kvstore
    # runs): horovodrun pipes every rank's output, where a bar would garble the log.
    progress: bool = field(default=True, metadata=FREE)
    # Every this many steps the host waits for the device once (bounds MXNet's async
    # queue and refreshes the progress bar's loss). Not a per-step sync.
    sync_every: int = field(default=50, metadata=FREE)


@dataclass
class DistributedConfig:
    """Backend and devices (section ``distributed``)."""

    # 'local': one process, one device (the single-GPU debug mode; no Horovod import).
    # 'horovod': one process per device under horovodrun. 'kvstore': one process, several
    # devices, gluon.Trainer(kvstore='device'). The launch scripts set it (launch/*.sh);
    # the configs in configs/ do not.
    backend: str = field(default="local", metadata=FREE)
    # 'auto': GPU when MXNet sees one, else CPU (logged). 'gpu': GPU or fail. 'cpu': CPU.
    device: str = field(default="auto", metadata=FREE)
    # kvstore only: 'all' (every GPU), a list of GPU ids like '0,1', or 'cpu:N' for N CPU contexts.
    devices: str = field(default="all", metadata=FREE)
    # Horovod only: 'none', or 'fp16' to send the gradients between ranks as float16
    # (half the bytes; each rank's gradient is rounded to float16 before the average, so
    # the update is no longer exactly one process's: an option, see docs/benchmark.md).
    compression: str = field(default="none", metadata=FREE)


@dataclass
class EvalConfig:
    """Rank-0 evaluation, projector export and run report (section ``eval``)."""

    # Seed of the fixed test triplets (made once from the test set; 9,990 on Fashion-MNIST).
    triplet_seed: int = field(default=0, metadata=FREE)
    # Rows per forward pass when embedding the test set.
    batch_size: int = field(default=2048, metadata=FREE)
    # Evaluate every N epochs (and always after the last).
    every: int = field(default=1, metadata=FREE)
    # R-Precision and MAP@R (the R nearest neighbours of every query) every N epochs; 0 =
    # only after the last epoch. Other evaluations compute Precision@1 (exact, one GEMM),
    # the triplet accuracy and the collapse check. Default 0: at 10k test items, 128-D, the
    # full set takes 1-3 s against ~0.15 s for P@1 alone, and an epoch of the main job
    # trains in ~1.45 s (issue 12: evaluation <= 15% of it).
    full_every: int = field(default=0, metadata=FREE)
    # Items searched for each test query: 'test' = the other test items (leave-one-out, as
    # pytorch-metric-learning's AccuracyCalculator); 'train' = the training set, which
    # makes P@1 the 1-nearest-neighbour accuracy (embeds the training set each evaluation;
    # P@1 ~12x the search cost on Fashion-MNIST, the full set at R = 6,000 per query ~200x:
    # 26 s / 555 s wall measured on a loaded machine; eval.max_queries bounds both).
    # Default 'test': the seed-compatible protocol.
    gallery: str = field(default="test", metadata=FREE)
    # Test queries per evaluation: 0 = all; else a uniform sample of this many (seeded by
    # query_seed, the same every epoch) against the full gallery, for large test sets.
    max_queries: int = field(default=0, metadata=FREE)
    query_seed: int = field(default=0, metadata=FREE)
    # Largest gallery searched exactly (items); beyond it faiss IVF (approximate, flagged
    # 'approximate' in the results). Default: 10k queries x 250k items ~ 11 s for P@1 on 2
    # cores, measured (dist_triplet.metrics.EXACT_MAX_GALLERY).
    exact_max_gallery: int = field(default=250_000, metadata=FREE)
    # faiss IVF cells visited per query (approximate search only): recall@100 = 1.0 on
    # Fashion-MNIST embeddings at 32 of sqrt(60,000) = 244 cells (knn.approximate_recall).
    nprobe: int = field(default=32, metadata=FREE)
    # Keep the raw-pixel baseline in <dir>/.cache/raw-<hash>.json beside the run
    # directories (<dir> = output.root, or output.dir's parent), keyed by a hash of the
    # test (and gallery) pixels and labels and the keys above that change it: a later run
    # on the same data skips the search (0.9 CPU s for P@1, 2.8 for the full set on
    # Fashion-MNIST's test set). false: compute it every run, write nothing there.
    raw_cache: bool = field(default=True, metadata=FREE)
    # Spread sqrt(mean ||e - mean e||^2) at or below this marks the embedding as collapsed.
    collapse_eps: float = field(default=1e-4, metadata=FREE)
    # Export the TensorBoard projector at the end (rank 0).
    projector: bool = field(default=True, metadata=FREE)
    projector_points: int = field(default=0, metadata=FREE)  # 0 = the whole test set
    # Write RUN/report/ at the end (rank 0): report.html with the metrics table, PCA of raw
    # inputs and embeddings, training curves and test neighbours (dist_triplet.report).
    report: bool = field(default=True, metadata=FREE)


@dataclass
class CheckpointConfig:
    """Epoch checkpoints and resume (section ``checkpoint``)."""

    # Keep the last K epoch checkpoints (0 = never write any).
    keep: int = field(default=3, metadata=FREE)
    # Resume: null (start fresh), 'auto' (latest checkpoint in output.dir if any) or a path
    # to a checkpoint directory.
    resume: Optional[str] = field(default=None, metadata=FREE)


@dataclass
class OutputConfig:
    """Where a run writes (section ``output``)."""

    # Run directory. null = <root>/<name>-<timestamp>, chosen by rank 0 and shared with all ranks.
    dir: Optional[str] = field(default=None, metadata=FREE)
    # Prefix of generated run directories; null = the config file's stem (e.g. fashion_mnist),
    # or the data set's name without a config file.
    name: Optional[str] = field(default=None, metadata=FREE)
    root: str = field(default="runs", metadata=FREE)


@dataclass
class Config:
    """The whole run configuration; each section is one dataclass above, every key documented where declared."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resume_policies() -> dict:
    """``{"section.key": "fixed" | "schedule" | "free"}`` for every key of ``Config``, read
    from the fields' metadata. Raises ConfigError naming a field that declares none."""
    out = {}
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory):
            policy = f.metadata.get("resume")
            if policy not in RESUME_POLICIES:
                raise ConfigError(f"config field {section.name}.{f.name} declares no resume "
                                  f"policy (metadata resume={policy!r}); give one of "
                                  f"{', '.join(RESUME_POLICIES)}")
            out[f"{section.name}.{f.name}"] = policy
    return out


def flat_dict(config: dict) -> dict:
    """``{"section.key": value}`` from a ``Config.to_dict()``-shaped mapping."""
    return {f"{s}.{k}": v for s, sub in config.items() if isinstance(sub, dict)
            for k, v in sub.items()}


_CHOICES = {
    "data.dataset": ("fashion_mnist", "mnist", "idx"),
    "data.format": ("auto", "idx", "npz", "folder", "csv"),
    "data.mode": ("L", "RGB"),
    "data.split": ("fraction", "classes"),
    "sampler.kind": ("offline", "pk"),
    "sampler.miner": ("batch_hard", "semi_hard"),
    "sampler.scope": ("local", "global"),
    "optim.optimizer": ("sgd", "adam"),
    "optim.schedule": ("constant", "cosine"),
    "distributed.backend": ("local", "horovod", "kvstore"),
    "distributed.compression": ("none", "fp16"),
    "distributed.device": ("auto", "cpu", "gpu"),
    "eval.gallery": ("test", "train"),
}
_POSITIVE = ("train.epochs", "train.batch_size", "train.sync_every", "sampler.p", "sampler.k",
             "eval.batch_size", "eval.every", "optim.base_batch", "eval.nprobe")
_NON_NEGATIVE = ("data.limit_train", "data.limit_test", "loss.margin", "optim.momentum",
                 "train.seed", "eval.triplet_seed", "data.split_seed",  # SeedSequence entropy must be >= 0
                 "optim.wd", "optim.warmup_epochs", "sampler.steps_per_epoch",
                 "eval.collapse_eps", "eval.projector_points", "checkpoint.keep",
                 "eval.full_every", "eval.max_queries", "eval.query_seed",
                 "eval.exact_max_gallery")


def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def _parse(value: Any, tp: Any, key: str, where: str) -> Any:
    """Coerce ``value`` (from YAML or a command-line string) to the declared type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _parse(value, next(a for a in args if a is not type(None)), key, where)
    if isinstance(value, str) and tp is not str:
        try:  # command-line values are strings; YAML gives them the same syntax as in a file
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: {key}={value!r} is not valid YAML: "
                              f"{_yaml_problem(exc)}") from None
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        return [_parse(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 and 1e30 (no dot, no exponent sign) as strings.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: {key} has unsupported type {tp}")  # pragma: no cover


def _set(cfg: Config, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{where}: {key!r} is not a known key; keys look like section.name, "
                          f"sections: {', '.join(f.name for f in dataclasses.fields(Config))}")
    section, name = parts
    sections = {f.name for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(f"{where}: unknown section {section!r} in key {key!r}; "
                          f"known sections: {', '.join(sorted(sections))}")
    sub = getattr(cfg, section)
    types = _field_types(type(sub))
    if name not in types:
        raise ConfigError(f"{where}: unknown key {key!r}; keys of {section}: "
                          f"{', '.join(sorted(types))}")
    if key == "data.image_size":
        # One int means a square: [S, S].
        try:
            probe = yaml.safe_load(value) if isinstance(value, str) else value
        except yaml.YAMLError:
            probe = value  # _parse reports it
        if isinstance(probe, int) and not isinstance(probe, bool):
            value = [probe, probe]
    setattr(sub, name, _parse(value, types[name], key, where))


def _validate(cfg: Config) -> None:
    flat = flat_dict(cfg.to_dict())
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key}={flat[key]!r} is not one of {', '.join(choices)}")
    for key in _POSITIVE:
        if flat[key] <= 0:
            raise ConfigError(f"{key}={flat[key]!r} must be > 0")
    for key in _NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"{key}={flat[key]!r} must be >= 0")
    if flat["eval.query_seed"] >= 2 ** 32:  # numpy.random.RandomState's seed range
        raise ConfigError(f"eval.query_seed={flat['eval.query_seed']!r} must be < 2**32")
    if not flat["optim.lr"] > 0:
        raise ConfigError(f"optim.lr={flat['optim.lr']!r} must be > 0")
    if not flat["model.init_scale"] > 0:
        raise ConfigError(f"model.init_scale={flat['model.init_scale']!r} must be > 0")
    if not cfg.model.hidden or any(w <= 0 for w in cfg.model.hidden):
        raise ConfigError(f"model.hidden={cfg.model.hidden!r} must be a non-empty list of "
                          "positive widths")
    if cfg.sampler.kind == "pk" and cfg.sampler.k < 2:
        raise ConfigError(f"sampler.k={cfg.sampler.k} must be >= 2: a P x K batch needs a "
                          "positive for every anchor")
    if cfg.sampler.kind == "pk" and cfg.sampler.p < 2:
        raise ConfigError(f"sampler.p={cfg.sampler.p} must be >= 2: a P x K batch needs a "
                          "negative (another class) for every anchor")
    if cfg.sampler.scope == "global" and cfg.sampler.kind != "pk":
        raise ConfigError(f"sampler.scope='global' needs sampler.kind='pk' (online mining), "
                          f"found sampler.kind={cfg.sampler.kind!r}")
    for key in ("output.dir", "output.root", "output.name"):
        value = flat[key]
        if value is not None and not value.strip():
            raise ConfigError(f"{key}={value!r} is empty; give a directory"
                              + (" or null for a new timestamped one" if key == "output.dir"
                                 else ""))
    if cfg.checkpoint.resume is not None and not cfg.checkpoint.resume.strip():
        raise ConfigError(f"checkpoint.resume={cfg.checkpoint.resume!r} is empty; give a "
                          "checkpoint directory, auto, or null for a fresh run")
    d = cfg.data
    if d.path is not None and not d.path.strip():
        raise ConfigError(f"data.path={d.path!r} is empty; give a file or directory, or null "
                          "for data.dataset")
    if d.path and d.root:
        raise ConfigError(f"data.root={d.root!r} belongs to data.dataset; with data.path="
                          f"{d.path!r} the data's location is data.path alone")
    if not d.path and d.format != "auto":
        raise ConfigError(f"data.format={d.format!r} needs data.path (your data's file or "
                          "directory)")
    if not 0.0 < d.test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction={d.test_fraction!r} must lie strictly between "
                          "0 and 1")
    if d.image_size is not None and (len(d.image_size) != 2 or min(d.image_size) < 1):
        raise ConfigError(f"data.image_size={d.image_size!r} must be [H, W] or one int, each "
                          ">= 1 (or null)")
    if cfg.data.dataset == "idx" and not cfg.data.path and not cfg.data.root:
        raise ConfigError("data.dataset='idx' needs data.root=DIR (a directory of IDX files)")
    if cfg.checkpoint.resume == "auto" and not cfg.output.dir:
        # A null output.dir is a new timestamped directory: there would be nothing to resume.
        raise ConfigError("checkpoint.resume='auto' needs output.dir=DIR (the run directory "
                          "whose checkpoints/ it continues from)")


def parse_devices(devices: str) -> Tuple[str, Union[int, List[int], None]]:
    """Parse ``distributed.devices`` (the one parser of it: ``dist.choose_contexts`` picks
    the contexts from it, ``train.default_threads`` counts CPU devices before MXNet starts,
    which is why it lives here and not in dist.py, which imports MXNet).

    Returns:
        ``("cpu", N)`` for ``'cpu:N'``; ``("gpu", None)`` for ``'all'``; ``("gpu", ids)``
        for GPU ids like ``'0,1'`` (ids not checked against the host here; may be empty).

    Raises:
        ValueError: ``'cpu:N'`` with N not an integer >= 1, or anything else that is not
            ``'all'`` or comma-separated integers (names the value).
    """
    if devices.startswith("cpu:"):
        try:
            n = int(devices.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"distributed.devices={devices!r}: 'cpu:N' needs N >= 1")
        return "cpu", n
    if devices == "all":
        return "gpu", None
    try:
        return "gpu", [int(x) for x in devices.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"distributed.devices={devices!r}: expected 'all', 'cpu:N' or "
                         "GPU ids like '0,1'") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: ``line L, column C: problem`` (1-based), as PyYAML's
    multi-line message would say it."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return " ".join(str(exc).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _key_lines(node) -> dict:
    """1-based line of each section key ``(section,)`` and key ``(section, name)`` of a
    composed YAML document (scalar keys only; others are left out)."""
    lines = {}
    if not isinstance(node, yaml.MappingNode):
        return lines
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode):
            continue
        lines[(key.value,)] = key.start_mark.line + 1
        if isinstance(value, yaml.MappingNode):
            for sub, _ in value.value:
                if isinstance(sub, yaml.ScalarNode):
                    lines[(key.value, sub.value)] = sub.start_mark.line + 1
    return lines


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Build the run's config: defaults, then the YAML file at ``path``, then overrides.

    Args:
        path: YAML file with a mapping ``section: {key: value}``; only keys that differ
            from the defaults need to appear. ``None`` = defaults only.
        overrides: strings ``section.key=value``; values use YAML syntax
            (``model.hidden=[512,128]``, ``checkpoint.resume=null``); whitespace around
            the value is dropped.

    Returns:
        The validated ``Config``.

    Raises:
        ConfigError: unknown section or key, a value of the wrong type, a value out of range
            or not among the choices; the message names the key (and the file).
        FileNotFoundError: ``path`` does not exist.
    """
    cfg = Config()
    if path is not None:
        if os.path.isdir(path):
            raise ConfigError(f"config file {path!r} is a directory; pass a YAML file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path!r} does not exist")
        with open(path, encoding="utf-8") as fh:
            try:
                loader = _UniqueKeyLoader(fh)
                loader.name = path
                try:
                    node = loader.get_single_node()
                    doc = (loader.construct_document(node) if node is not None else None) or {}
                    lines = _key_lines(node)
                finally:
                    loader.dispose()
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: "
                                  f"{exc.reason}); save the config as UTF-8") from None
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got "
                              f"{type(doc).__name__}")
        def at(*keys):
            line = lines.get(tuple(str(k) for k in keys))
            return path if line is None else f"{path}: line {line}"

        for section, values in doc.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{at(section)}: section {section!r} must be a mapping of keys")
            for name, value in values.items():
                _set(cfg, f"{section}.{name}", value, at(section, name))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        # Surrounding whitespace of a command-line value is dropped (as YAML does for a
        # plain scalar in a file): output.dir=" runs/a " means runs/a.
        _set(cfg, key.strip(), value.strip(), "command line")
    if cfg.output.name is None:
        cfg.output.name = (os.path.splitext(os.path.basename(path))[0] if path
                           else os.path.splitext(os.path.basename(os.path.normpath(
                               cfg.data.path)))[0] if cfg.data.path else cfg.data.dataset)
    try:
        _validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None
    return cfg


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML, atomically (``fsutil.atomic_write``)."""
    with atomic_write(path) as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)


def config_from_dict(doc: dict) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. a checkpoint's copy)."""
    cfg = Config()
    for section, values in doc.items():
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value, "saved config")
    return cfg
