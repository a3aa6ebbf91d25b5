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
  averages the workers. With ``sampler.scope: global`` the workers mine their anchors in
  the *global* batch and share the exact gradient of its mean loss, so the averaged
  update is one process's on the global batch (model.GlobalMinedTripletStep).

Resume policy: every field declares in its metadata what a resumed run may do with it
(``checkpoint.check_compatible`` reads it through :func:`resume_policies`; a test checks
that every field has one). A field is declared with its policy, its default and the checks
of its value (choices, bounds), in one place::

    name: int = fixed(0, least=0)            # or scheduled(...), free(...)
    kind: str = fixed("a", choices=("a", "b"))

* ``fixed``: must equal the checkpoint's value. The key changes the parameters' shapes,
  what a step computes, the optimizer state's meaning (momentum and wd are pickled with the
  optimizer in trainer.states, so a new value would be silently ignored), or which triplets
  each worker draws.
* ``scheduled`` (policy "schedule"): may change. The learning rate of every step
  is recomputed from the current config (``schedule.learning_rate``), so lowering optim.lr
  after a divergence, or extending train.epochs, works. An info line names the changed
  keys; a warning (the run then differs from an uninterrupted one with the old values)
  follows only when a remaining step's learning rate differs (``plan.read_resume_meta``).
* ``free``: may change silently (evaluation, output, progress, devices: the world size
  itself is checked from the checkpoint's processes x devices).

Why not OmegaConf structured configs: OmegaConf is not installed in the project's
environment (it would be a new dependency), and what this module does by hand is small and
specific: error messages that name where a value was given, the key and the value
(``cfg.yaml: line 7: train.epochs must be an integer, got 'two'``; ``command line:
train.epochs=-1 must be > 0`` for an override), duplicate YAML keys refused (OmegaConf,
like PyYAML, keeps the last one), range and choice checks with the key in the message, and
the typed per-field resume policy above (dataclass metadata, which OmegaConf would carry
too but not use). Dotted overrides are the one feature both have.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple, Union

import yaml

from .configfile import ConfigError, parse_value, read_yaml
from .fsutil import atomic_write
from .zoo import BACKBONES


RESUME_POLICIES = ("fixed", "schedule", "free")


def _key(policy: str, default=dataclasses.MISSING, *, factory=dataclasses.MISSING,
         choices: Optional[Tuple] = None, least=None, above=None, below=None):
    """A config field whose metadata carries its resume policy (module docstring) and
    the checks :func:`load_config` applies to its value: one of ``choices``; ``>= least``;
    ``> above``; ``< below``."""
    checks = {"choices": choices, "least": least, "above": above, "below": below}
    metadata = {"resume": policy, **{k: v for k, v in checks.items() if v is not None}}
    return field(default=default, default_factory=factory, metadata=metadata)


def fixed(default=dataclasses.MISSING, **checks):
    """A key a resumed run must keep (policy ``fixed``); ``checks`` as :func:`_key`."""
    return _key("fixed", default, **checks)


def scheduled(default=dataclasses.MISSING, **checks):
    """A key of the learning-rate schedule (policy ``schedule``): may change on resume."""
    return _key("schedule", default, **checks)


def free(default=dataclasses.MISSING, **checks):
    """A key that may change on resume without a word (policy ``free``)."""
    return _key("free", default, **checks)


@dataclass(frozen=True)
class DataConfig:
    """Where the data come from and how they are split (section ``data``; docs/data.md)."""

    # Named MNIST-format data set, used when data.path is null: 'fashion_mnist' (Debian's
    # dataset-fashion-mnist), 'mnist' (MXNet downloads it when root is null and the network
    # allows) or 'idx' (any MNIST-format directory in root).
    dataset: str = fixed("fashion_mnist", choices=("fashion_mnist", "mnist", "idx"))
    # Directory holding the four IDX files (gzip or raw); null = the data set's default place.
    root: Optional[str] = free(None)
    # Your own data: a file or directory (then data.dataset and data.root are not used).
    # Free on resume like data.root (the same data may move; other data: plan.data_digest).
    path: Optional[str] = free(None)
    # Format of data.path: 'auto' (from the name/content where unambiguous), 'idx' (a
    # directory of the four MNIST-format files, any rows x cols), 'npz' (x, y[, classes];
    # or a directory with train.npz[, test.npz]), 'folder' (ROOT/<class>/*.png|jpg, or
    # ROOT/train + ROOT/test), 'csv' (path,label[,split], the open-metric-learning layout).
    format: str = fixed("auto", choices=("auto", "idx", "npz", "folder", "csv"))
    # Image files (folder, csv): Pillow mode 'L' (1 channel) or 'RGB' (3 channels).
    mode: str = fixed("RGB", choices=("L", "RGB"))
    # Image files: resize every image to [H, W] (one int = square); null = all images must
    # share one size. Pillow's bilinear filter.
    image_size: Optional[List[int]] = fixed(None)
    # Data without a test split: 'fraction' = stratified per class (data.test_fraction of
    # each class to test), or 'classes' = the last data.test_fraction of the classes are test
    # classes, never seen in training (CUB-200 / Cars196 / SOP protocol; 1-sample classes
    # become test queries). Also decides whether a 1-sample test class is allowed.
    split: str = fixed("fraction", choices=("fraction", "classes"))
    # In (0, 1): the share of each class (fraction), or of the classes (classes), to test.
    test_fraction: float = fixed(0.2, above=0, below=1)
    # Seed of the stratified split; not train.seed, so a new run seed keeps the split.
    split_seed: int = fixed(0, least=0)
    # Directory for the shared uint8 .npy cache: the first process of a host decodes the
    # data once, every process memory-maps it (one copy per host). null = each process
    # reads the data into its own memory (fine for small data such as Fashion-MNIST).
    cache_dir: Optional[str] = free(None)
    # Use only N training / test samples (0 = all), a sample seeded by data.split_seed and
    # balanced over the classes (data/split.py limit_rows; docs/data.md). For quick runs.
    limit_train: int = fixed(0, least=0)
    limit_test: int = free(0, least=0)


@dataclass(frozen=True)
class ModelConfig:
    """The embedding network (section ``model``; dist_triplet/backbone.py)."""

    # mlp (the seed's), convnet (Conv-BN-ReLU blocks) or a model_zoo name; see backbone.py
    backbone: str = fixed("mlp", choices=BACKBONES)
    # Dense widths after the backbone (mlp: on the raw rows); the last one is the
    # embedding size D. Seed article: Dense(256, relu) -> Dense(128, relu).
    hidden: List[int] = fixed(factory=lambda: [256, 128])
    # convnet only (refused elsewhere): the Conv3x3 widths, one block each
    channels: List[int] = fixed(factory=lambda: [32, 64, 128])
    # convnet: 'avg' pools the last feature map globally (any input size); 'flatten' keeps
    # where each feature is (a Dense over C x h x w; fixed input size; convnet only).
    pool: str = fixed("avg", choices=("avg", "flatten"))
    weights: Optional[str] = free(None)  # .params a new run starts from; a resume: its checkpoint
    # ReLU after the last layer too, as the seed. Set false with normalize: true, so the
    # embedding can point anywhere on the sphere rather than in the positive orthant.
    final_relu: bool = fixed(True)
    # L2-normalise embeddings (FaceNet, Schroff et al. 2015). Squared distances are then
    # in [0, 4], and the margin is in those units.
    normalize: bool = fixed(False)
    # Uniform(-init_scale, init_scale) weight init, as the seed's mx.init.Uniform(0.1).
    init_scale: float = free(0.1, above=0)


@dataclass(frozen=True)
class LossConfig:
    """The triplet loss (section ``loss``)."""

    # Triplet margin, in squared-L2 units as gluon.loss.TripletLoss:
    # loss = max(0, ||a-p||^2 - ||a-n||^2 + margin). Default 1: Gluon's default, used by the seed.
    margin: float = fixed(1.0, least=0)


@dataclass(frozen=True)
class SamplerConfig:
    """How triplets are drawn: offline create_pairs or P x K online mining (section ``sampler``)."""

    # 'offline': the seed's create_pairs triplets, made per rank each epoch (default).
    # 'pk': class-balanced batches of p classes x k samples with online mining.
    kind: str = fixed("offline", choices=("offline", "pk"))
    p: int = fixed(16, above=0)              # classes per P x K batch
    k: int = fixed(8, above=0)               # samples per class in a P x K batch
    # Miner (kind pk): batch_hard (Hermans 2017), semi_hard (FaceNet), distance_weighted (Wu 2017)
    miner: str = fixed("semi_hard", choices=("batch_hard", "semi_hard", "distance_weighted"))
    # P x K batches per epoch per worker; 0 = as many as cover the training set once.
    steps_per_epoch: int = fixed(0, least=0)
    # What the miner sees (kind 'pk'). 'local': each worker mines inside its own P x K
    # batch. 'global': all workers draw the same p classes (k images each) and mine their
    # anchors over the gathered global batch; the update is one process's on it (issue 13).
    scope: str = fixed("local", choices=("local", "global"))
    # Cross-batch memory (XBM, Wang 2020): mine negatives in the last N global batches too.
    memory: int = fixed(0, least=0)


@dataclass(frozen=True)
class AugmentConfig:
    """Image augmentation in the step, off by default (section ``augment``; augment.py)."""

    pad: int = fixed(0, least=0)   # random crop: shift by up to pad pixels, zero fill
    flip: bool = fixed(False)      # mirror left-right with probability 1/2


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule (section ``optim``)."""

    optimizer: str = fixed("sgd", choices=("sgd", "adam"))   # 'sgd' (seed) or 'adam'
    # Learning rate of the global batch (see the module docstring). Seed: 0.05.
    lr: float = scheduled(0.05, above=0)
    momentum: float = fixed(0.0, least=0)    # sgd only
    wd: float = fixed(0.0, least=0)          # L2 weight decay
    # 'constant' (seed) or 'cosine' (decays per step to 0 over the run, after warm-up).
    schedule: str = scheduled("constant", choices=("constant", "cosine"))
    # Linear warm-up from 0, in epochs.
    warmup_epochs: float = scheduled(0.0, least=0)
    # Linear scaling rule: lr * global_batch / base_batch (Goyal et al. 2017).
    scale_lr: bool = scheduled(False)
    base_batch: int = scheduled(256, above=0)


@dataclass(frozen=True)
class TrainConfig:
    """Epochs, per-worker batch and run seed (section ``train``)."""

    epochs: int = scheduled(10, above=0)         # seed: 10
    # Triplets per worker per step (offline sampler). Global batch = world size x batch_size.
    batch_size: int = fixed(256, above=0)
    # Run seed: triplets are a function of (seed, epoch, rank); parameters init from it.
    seed: int = fixed(42, least=0)
    # Progress bar on rank 0 (tqdm), shown only when stderr is a terminal (debug and kvstore
    # runs): horovodrun pipes every rank's output, where a bar would garble the log.
    progress: bool = free(True)
    # Every this many steps the host waits for the device once (bounds MXNet's async
    # queue and refreshes the progress bar's loss). Not a per-step sync.
    sync_every: int = free(50, above=0)


@dataclass(frozen=True)
class DistributedConfig:
    """Backend and devices (section ``distributed``)."""

    # 'auto': 'horovod' when horovodrun or mpirun started this process as one of several
    # (HOROVOD_SIZE, OMPI_COMM_WORLD_SIZE or PMI_SIZE > 1), else 'local' (launcher.py).
    # 'local': one process, one device (debug mode; no Horovod import). 'horovod': one process
    # per device. 'kvstore' (by name only): one process, gluon.Trainer(kvstore='device').
    backend: str = free("auto", choices=("auto", "local", "horovod", "kvstore"))
    # 'auto': GPU when MXNet sees one, else CPU (logged). 'gpu': GPU or fail. 'cpu': CPU.
    device: str = free("auto", choices=("auto", "cpu", "gpu"))
    # kvstore only: 'all' (every GPU), a list of GPU ids like '0,1', or 'cpu:N' for N CPU contexts.
    devices: str = free("all")
    # Horovod only: 'fp16' sends gradients as float16 (half the bytes, inexact: docs/benchmark.md).
    compression: str = free("none", choices=("none", "fp16"))


@dataclass(frozen=True)
class EvalConfig:
    """Rank-0 evaluation, projector export and run report (section ``eval``)."""

    # Seed of the fixed test triplets (made once from the test set; 9,990 on Fashion-MNIST).
    triplet_seed: int = free(0, least=0)
    # Rows per forward pass when embedding the test set.
    batch_size: int = free(2048, above=0)
    # Evaluate every N epochs (and always after the last).
    every: int = free(1, above=0)
    # R-Precision and MAP@R (the R nearest neighbours of every query) every N epochs; 0 =
    # only after the last epoch. Other evaluations compute Precision@1, the triplet accuracy
    # and the collapse check. Default 0: at 10k test items, 128-D, the full set takes 1-3 s
    # against ~0.15 s for P@1 alone, and an epoch of the main job trains in ~1.5-3 s.
    full_every: int = free(0, least=0)
    # Items searched for each test query: 'test' = the other test items (leave-one-out, as
    # pytorch-metric-learning's AccuracyCalculator); 'train' = the training set, which
    # makes P@1 the 1-nearest-neighbour accuracy (embeds the training set each evaluation;
    # P@1 ~12x the search cost on Fashion-MNIST, the full set at R = 6,000 per query ~200x:
    # 26 s / 555 s wall measured on a loaded machine; eval.max_queries bounds both).
    # Default 'test': the seed-compatible protocol.
    gallery: str = free("test", choices=("test", "train"))
    # Test queries per evaluation: 0 = all; else a uniform sample of this many (seeded by
    # query_seed, the same every epoch) against the full gallery, for large test sets.
    max_queries: int = free(0, least=0)
    query_seed: int = free(0, least=0, below=2**32)
    # Largest gallery searched exactly (items); beyond it faiss IVF (approximate, flagged so
    # in the results). Default: 10k queries x 250k items ~ 11 s for P@1 on 2 cores.
    exact_max_gallery: int = free(250_000, least=0)
    # faiss IVF cells visited per query (approximate search only): recall@100 = 1.0 on
    # Fashion-MNIST embeddings at 32 of sqrt(60,000) = 244 cells (retrieval.neighbours.recall_at_k).
    nprobe: int = free(32, above=0)
    # Keep the raw-pixel baseline in <dir>/.cache/raw-<hash>.json beside the run
    # directories (<dir> = output.root, or output.dir's parent), keyed by a hash of the
    # test (and gallery) pixels and labels and the keys above that change it: a later run
    # on the same data skips the search (0.9 CPU s for P@1, 2.8 for the full set on
    # Fashion-MNIST's test set). false: compute it every run, write nothing there.
    raw_cache: bool = free(True)
    # Spread sqrt(mean ||e - mean e||^2) at or below this marks the embedding as collapsed.
    collapse_eps: float = free(1e-4, least=0)
    # Export the TensorBoard projector at the end (rank 0).
    projector: bool = free(True)
    projector_points: int = free(0, least=0)  # 0 = the whole test set
    # Write RUN/report/ at the end (rank 0): report.html with the metrics table, PCA of raw
    # inputs and embeddings, training curves and test neighbours (dist_triplet.report).
    report: bool = free(True)


@dataclass(frozen=True)
class CheckpointConfig:
    """Epoch checkpoints and resume (section ``checkpoint``)."""

    # Keep the last K epoch checkpoints (0 = never write any).
    keep: int = free(3, least=0)
    # Resume: null (start fresh), 'auto' (latest checkpoint in output.dir if any) or a path
    # to a checkpoint directory.
    resume: Optional[str] = free(None)


@dataclass(frozen=True)
class OutputConfig:
    """Where a run writes (section ``output``)."""

    # Run directory. null = <root>/<name>-<timestamp>, chosen by rank 0 and shared with all ranks.
    dir: Optional[str] = free(None)
    # Prefix of generated run directories; null = the config file's stem (e.g. fashion_mnist),
    # or the data set's name without a config file.
    name: Optional[str] = free(None)
    root: str = free("runs")


@dataclass(frozen=True)
class Config:
    """The whole run configuration; each section is one dataclass above, every key documented where declared."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Section name -> its dataclass.
_SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}
# Bounds spelled as in the docs.
_BOUND_NAMES = {2 ** 32: "2**32"}  # eval.query_seed: numpy.random.RandomState's seed range


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


def _set(values: dict, key: str, value: Any, where: str) -> None:
    """Parse ``value`` for ``key`` (``section.name``) and store it in ``values``
    (``{section: {name: value}}``, what :func:`_build` makes the frozen Config from) and
    ``where`` (file and line, or "command line") in ``values["where"][key]``, for errors."""
    parts = key.split(".")
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    if len(parts) != 2:
        raise ConfigError(f"{where}: {key!r} is not a known key; keys look like section.name, "
                          f"sections: {', '.join(sections)}")
    section, name = parts
    if section not in sections:
        raise ConfigError(f"{where}: unknown section {section!r} in key {key!r}; "
                          f"known sections: {', '.join(sorted(sections))}")
    types = typing.get_type_hints(_SECTIONS[section])
    if name not in types:
        raise ConfigError(f"{where}: unknown key {key!r}; keys of {section}: "
                          f"{', '.join(sorted(types))}")
    if key == "data.image_size":
        # One int means a square: [S, S].
        try:
            probe = yaml.safe_load(value) if isinstance(value, str) else value
        except yaml.YAMLError:
            probe = value  # parse_value reports it
        if isinstance(probe, int) and not isinstance(probe, bool):
            value = [probe, probe]
    values.setdefault(section, {})[name] = parse_value(value, types[name], key, where)
    values.setdefault("where", {})[key] = where                  # not a section: not built


def _build(values: dict) -> Config:
    """The frozen Config of ``values`` (``{section: {name: value}}``; the rest default)."""
    return Config(**{section: cls(**values.get(section, {}))
                     for section, cls in _SECTIONS.items()})


def _check_fields(cfg: Config) -> None:
    """Each value against the checks declared with its field (:func:`_key`)."""
    for section in dataclasses.fields(Config):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            key, value, md = f"{section.name}.{f.name}", getattr(sub, f.name), f.metadata
            if "choices" in md and value not in md["choices"]:
                raise ConfigError(f"{key}={value!r} is not one of {', '.join(md['choices'])}")
            if "least" in md and value < md["least"]:
                raise ConfigError(f"{key}={value!r} must be >= {md['least']}")
            low, high = md.get("above"), md.get("below")
            if low is not None and high is not None and not low < value < high:
                raise ConfigError(f"{key}={value!r} must lie strictly between {low} and {high}")
            if low is not None and not value > low:
                raise ConfigError(f"{key}={value!r} must be > {low}")
            if high is not None and not value < high:
                raise ConfigError(f"{key}={value!r} must be < {_BOUND_NAMES.get(high, high)}")


def _validate(cfg: Config) -> None:
    """The checks of each field (:func:`_check_fields`), then those that relate keys."""
    _check_fields(cfg)
    for key, ws in (("model.hidden", cfg.model.hidden), ("model.channels", cfg.model.channels)):
        if not ws or any(w <= 0 for w in ws):
            raise ConfigError(f"{key}={ws!r} must be a non-empty list of positive widths")
    if cfg.sampler.kind == "pk" and cfg.sampler.k < 2:
        raise ConfigError(f"sampler.k={cfg.sampler.k} must be >= 2: a P x K batch needs a "
                          "positive for every anchor")
    if cfg.sampler.kind == "pk" and cfg.sampler.p < 2:
        raise ConfigError(f"sampler.p={cfg.sampler.p} must be >= 2: a P x K batch needs a "
                          "negative (another class) for every anchor")
    if cfg.sampler.memory and cfg.sampler.scope != "global":
        raise ConfigError(f"sampler.memory={cfg.sampler.memory} needs sampler.scope='global'")
    if cfg.sampler.miner == "distance_weighted" and not cfg.model.normalize:
        raise ConfigError("sampler.miner='distance_weighted' needs model.normalize=true")
    if cfg.sampler.scope == "global" and cfg.sampler.kind != "pk":
        raise ConfigError(f"sampler.scope='global' needs sampler.kind='pk' (online mining), "
                          f"found sampler.kind={cfg.sampler.kind!r}")
    for key, value in (("output.dir", cfg.output.dir), ("output.root", cfg.output.root),
                       ("output.name", cfg.output.name)):
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


def _apply_file(values: dict, path: str, chain: Tuple[str, ...] = ()) -> None:
    """Set the keys of the YAML file ``path`` in ``values``, after those of its ``base``
    file (a top-level ``base: other.yaml``, relative to ``path``'s directory; bases may
    have bases). ``chain``: the files that include this one (a cycle is refused)."""
    chain = chain + (os.path.realpath(path),)
    doc, lines = read_yaml(path)

    def at(*keys):
        line = lines.get(tuple(str(k) for k in keys))
        return path if line is None else f"{path}: line {line}"

    base = doc.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{at('base')}: base must name a YAML file, got {base!r}")
        base_path = os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(base_path):
            raise ConfigError(f"{at('base')}: base file {base!r} not found ({base_path})")
        if os.path.realpath(base_path) in chain:
            names = " -> ".join(os.path.basename(p) for p in chain + (base_path,))
            raise ConfigError(f"{at('base')}: base files include each other ({names}); "
                              "remove one base")
        _apply_file(values, base_path, chain)
    for section, items in doc.items():
        if not isinstance(items, dict) and items is not None:    # None: keys commented out
            raise ConfigError(f"{at(section)}: section {section!r} must be a mapping of keys")
        for name, value in (items or {}).items():
            _set(values, f"{section}.{name}", value, at(section, name))


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Build the run's config: defaults, then the YAML file at ``path`` (after its base
    files), then overrides; validated and frozen (assigning a key raises).

    Args:
        path: YAML file with a mapping ``section: {key: value}``; only keys that differ
            from the defaults need to appear. A top-level ``base: FILE`` (relative to
            ``path``) applies FILE's keys first, so a recipe holds only what differs from
            the one it builds on. ``None`` = defaults only.
        overrides: strings ``section.key=value``; values use YAML syntax
            (``model.hidden=[512,128]``, ``checkpoint.resume=null``); whitespace around
            the value is dropped.

    Returns:
        The validated, frozen ``Config``.

    Raises:
        ConfigError: unknown section or key, a value of the wrong type, a value out of range
            or not among the choices, a missing or cyclic base file; the message names the
            key (and the file and line).
        FileNotFoundError: ``path`` does not exist.
    """
    values: dict = {}
    if path is not None:
        _apply_file(values, path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        # Surrounding whitespace of a command-line value is dropped (as YAML does for a
        # plain scalar in a file): output.dir=" runs/a " means runs/a.
        _set(values, key.strip(), value.strip(), "command line")
    output = values.setdefault("output", {})
    if output.get("name") is None:
        data_path = values.get("data", {}).get("path")
        output["name"] = (os.path.splitext(os.path.basename(path))[0] if path
                          else os.path.splitext(os.path.basename(os.path.normpath(
                              data_path)))[0] if data_path
                          else values.get("data", {}).get("dataset", DataConfig.dataset))
    cfg = _build(values)
    try:
        _validate(cfg)
    except ConfigError as exc:      # its message starts with the key: "section.name=..."
        where = values.get("where", {}).get(str(exc).split("=", 1)[0], path or "config")
        raise ConfigError(f"{where}: {exc}") from None
    return cfg


def config_yaml(cfg: Config) -> str:
    """The resolved config as a YAML document (every key, in declaration order)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML, atomically (``fsutil.atomic_write``)."""
    with atomic_write(path) as fh:
        fh.write(config_yaml(cfg))


def config_from_dict(doc: dict) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. a checkpoint's copy)."""
    values: dict = {}
    for section, items in doc.items():
        for name, value in items.items():
            _set(values, f"{section}.{name}", value, "saved config")
    return _build(values)
