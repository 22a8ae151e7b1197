"""One typed configuration and one loader.

Defaults live in frozen dataclasses. Command-line flags and ``LABELSMART_<SECTION>_<FIELD>`` environment
variables (for example ``LABELSMART_TRAIN_STEPS=20``) override them, and only inside :func:`load`; no other
module reads the environment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    """Network built by :func:`labelsmart.training.model.build_model` (segmentation_models_pytorch)."""

    arch: str = "DeepLabV3Plus"  # any smp architecture name: DeepLabV3Plus, Unet, FPN, ...
    # any smp / timm ("tu-...") encoder name; timm's ResNet-10-T (one block per stage, a three-convolution stem) trains
    # 1.4x the steps of ResNet-18 in the same minutes and gave +2.6 mIoU on a new CamVid street (three seeds), level
    # on ISBI EM, from random initialisation (BENCHMARKS.md, "Label efficiency, ninth pass"); with ImageNet weights
    # (encoder_weights) give the encoder they are for, e.g. resnet18
    encoder: str = "tu-resnet10t"
    encoder_weights: str | None = None  # path to a local weights file; nothing is downloaded
    decoder_channels: int = 128  # width of the decoder features that feed both heads
    proj_dim: int = 256  # projection head width (contrastive pretraining only)


@dataclass(frozen=True)
class PreprocessConfig:
    """The one preprocessing path shared by training, export, the predictor and the CLI."""

    max_side: int = 320  # images are resized so that their longer side is at most this (working scale)
    pad_multiple: int = 32  # network input is padded to a multiple of this
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class TrainConfig:
    """One training round: cross-entropy on the labelled pixels, optionally after contrastive pretraining.

    The defaults are what won the label-efficiency benchmark (BENCHMARKS.md, "Label efficiency"): at equal
    steps, cross-entropy alone was level with or ahead of the paper's two-stage split (30 % contrastive
    pretraining) in 15 of 16 comparisons on CamVid and ISBI EM (two seeds, up to 3x a round's steps); the
    joint and semi-supervised contrastive objectives did not win either. They all stay available here.
    Class-balanced cross-entropy (``class_balance`` 0.5) won over plain cross-entropy on CamVid (third pass).
    The CRF loss (``crf_weight``) won on ISBI EM and lost on a new CamVid street (seventh pass), so it is off.
    """

    steps: int = 300  # optimisation steps of a warm-started round (pretrain + fine-tune)
    first_round_steps: int = 150  # the first round is short so the first pre-annotation comes soon
    pretrain_fraction: float = 0.0  # share of a round's steps spent on contrastive pretraining (paper: 0.3)
    max_round_seconds: float = 0.0  # wall-clock cap per round (0 = none); both stages shrink to fit
    batch_size: int = 4
    crop: int = 192  # square training crop at working scale
    lr: float = 1e-3
    weight_decay: float = 1e-4
    # Class balancing of the cross-entropy (0 = off): class k's weight is (labelled pixels of k / median
    # over the labelled classes) ** -class_balance, clipped to [0.1, 10], counted once per round over the
    # training labels at working scale; 1 is median-frequency balancing, 0.5 its square root.
    class_balance: float = 0.5
    temperature: float = 0.1  # supervised pixel contrastive loss temperature
    pixels_per_class: int = 64  # labelled pixels sampled per class per image for the contrastive loss
    # Joint objective (0 = off): fine-tuning adds this weight times the pixel contrastive loss to the CE loss,
    # both from one forward pass over two photometric views of batch_size // 2 crops (so a step costs what a
    # CE step over batch_size crops costs).
    contrastive_weight: float = 0.0
    # Semi-supervised joint objective (0 = off; the paper's variant with pseudo-labels): once pseudo_after of
    # the fine-tuning steps are done, each step also takes batch_size // 2 crops of unlabelled images (at most
    # unlabelled_images of them, drawn once per round) in two views; their pixels the network predicts with
    # probability >= pseudo_threshold join the labelled pixels in the pixel contrastive loss, weighted by
    # pseudo_weight and added to the CE loss of the labelled crops. A step costs about two CE steps.
    pseudo_weight: float = 0.0
    pseudo_threshold: float = 0.9
    pseudo_after: float = 0.3
    unlabelled_images: int = 256
    # Self-training on the unlabelled images, FixMatch-style (0 = off): once pseudo_after of the fine-tuning steps are
    # done, each step also takes batch_size // 2 (at least 2) crops of unlabelled images; a teacher's prediction on the
    # plain crop (the weak view) gives each pixel a pseudo-label, kept where its probability reaches the class's
    # threshold, and the network learns it by cross-entropy on a strongly augmented view of the same crop (colour
    # jitter, grey, blur, a cut-out), weighted by unlabelled_weight and averaged over all the crops' pixels. The teacher
    # is the network itself (teacher_ema 0) or a moving average of its weights (a mean teacher, teacher_ema e.g. 0.99).
    # With pseudo_class_balance the thresholds are FlexMatch's: pseudo_threshold times a class's share of confident
    # pixels relative to the most confident class (mapped x / (2 - x), at least pseudo_min_threshold), so rare classes
    # get pseudo-labels too.
    unlabelled_weight: float = 0.0
    teacher_ema: float = 0.0
    pseudo_class_balance: bool = True
    pseudo_min_threshold: float = 0.5
    # A CRF loss on the unlabelled pixels of the labelled crops (0 = off; losses.local_crf_loss): crf_weight times
    # the Potts relaxation of a CRF with a Gaussian colour-and-position kernel (bandwidths crf_sigma_xy pixels,
    # crf_sigma_rgb on 0..1 colour) over a (2 crf_radius + 1)^2 window, on the probabilities and the crop shrunk
    # crf_downsample times, is added to the cross-entropy of the labelled crops (Tang et al., ECCV 2018; the window
    # and bandwidths of the gated CRF loss, Obukhov et al. 2019), in every objective but the semi-supervised one
    crf_weight: float = 0.0
    crf_sigma_xy: float = 6.0
    crf_sigma_rgb: float = 0.1
    crf_radius: int = 5
    crf_downsample: int = 2
    device: str = "auto"  # auto | cpu | cuda
    # Arithmetic of the training step: fp32, or bf16 autocast (weights, optimiser and losses stay float32). auto is
    # bf16 on CUDA and on a CPU that multiplies bfloat16 natively (AVX-512 BF16 or AMX), fp32 on other CPUs, which
    # have no bfloat16 instructions (bf16 was not measured there; BENCHMARKS.md, "Label efficiency, ninth pass")
    precision: str = "auto"  # auto | fp32 | bf16
    # On CUDA, augment the labelled crops on the GPU (training.device_data) rather than in CPU loader workers, which
    # left a GPU round input-bound; the CPU keeps the loader (there the torch path is the slower one)
    device_augment: bool = True
    threads: int = 0  # torch CPU threads (0 = all cores)
    seed: int = 0
    val_min_images: int = 10  # hold out images for validation only once this many are labelled
    val_every: int = 5  # then every n-th labelled image (by id; continuous: by a hash of the id) is held out
    ema_decay: float = 0.98  # continuous trainer: the published weights are this moving average of the trained ones


@dataclass(frozen=True)
class TriggerConfig:
    """When the background trainer trains and publishes.

    ``mode`` ``continuous`` (the default, :mod:`labelsmart.training.continuous`): one network trains without a
    pause while there are labels; a save joins the training set at the next poll. A version is published

    - the first time after ``first_publish_steps`` steps (the first pre-annotation comes quickly),
    - then ``publish_min_steps`` steps after the oldest save the served version has not seen (newer saves do not
      put it off),
    - or every ``publish_every_s`` of further training without new labels,
    - at most every ``publish_min_interval_s``, and at once on "Train now";

    and only if it scores no worse than the served version on the held-out labels, less ``publish_tolerance``
    (mIoU, 0..1), once at least ``publish_gate_images`` are held out.
    After ``idle_after_s`` without new labels or a better held-out score the trainer idles until the
    next save. Only the newest ``keep_versions`` published versions keep their files (0 keeps all).

    ``mode`` ``rounds``: capped rounds, each started when ``min_new_pixels`` arrived and ``min_interval_s`` passed.
    """

    mode: str = "continuous"  # continuous | rounds
    first_publish_steps: int = 30
    publish_min_steps: int = 30
    publish_min_interval_s: float = 15.0
    publish_every_s: float = 120.0
    publish_tolerance: float = 0.02
    publish_gate_images: int = 3  # the regression gate needs this many held-out images (fewer say little)
    idle_after_s: float = 300.0
    keep_versions: int = 20
    min_new_pixels: int = 500  # new labelled pixels since the last round's snapshot
    min_interval_s: float = 30.0  # at most one automatic round per interval ("Train now" ignores it)
    min_classes: int = 2  # a round needs labels of at least this many classes
    poll_s: float = 1.0
    # Wall-clock caps of background rounds (training; export comes on top), used when train.max_round_seconds
    # is 0: the first pre-annotation comes within ~3 min and later rounds stay bounded on a busy CPU.
    first_round_seconds: float = 120.0
    round_seconds: float = 240.0


@dataclass(frozen=True)
class ServeConfig:
    """ONNX Runtime predictor."""

    threads: int = 0  # ORT intra-op threads (0 = all cores)
    device: str = "auto"  # auto | cpu | cuda
    cache_size: int = 64  # predictions kept in memory (all are also cached on disk)


@dataclass(frozen=True)
class ActiveConfig:
    """Active learning: which image "Next" offers (see labelsmart/active.py)."""

    order: str = "suggested"  # what Next does: suggested (most uncertain, no near-duplicates) | sequential
    method: str = "entropy"  # per-pixel uncertainty: entropy | margin
    score: bool = True  # the trainer scores unlabelled images after each published version
    max_images: int = 2000  # images scored per version (a random sample when more are unlabelled)
    max_seconds: float = 120.0  # time budget of scoring per version (0 = none)
    threads: int = 1  # ONNX Runtime threads for scoring (the trainer's CPU share)
    duplicate_similarity: float = 0.85  # thumbnail cosine similarity from which two images count as one view


@dataclass(frozen=True)
class Config:
    """Everything a labelsmart process needs to know."""

    dataset: Path | None = None  # folder of images (read-only)
    image_root: Path | None = None  # where images are listed from (dataset or dataset/images)
    workdir: Path | None = None  # project state: SQLite store, prediction cache
    models_dir: Path = Path("models")  # model registry: models/<project>/vNNNN/ (load() makes it absolute)
    exports_dir: Path = Path("exports")
    project: str = "project"
    classes_file: Path | None = None
    import_masks: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    author: str = "annotator"
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    active: ActiveConfig = field(default_factory=ActiveConfig)

    @property
    def project_models_dir(self) -> Path:
        """Folder holding this project's model versions."""
        return self.models_dir / self.project

    @property
    def db_path(self) -> Path:
        """The project's SQLite database."""
        assert self.workdir is not None, "config has no workdir"
        return self.workdir / "project.sqlite"


# Flat flag names (as the CLI spells them) -> (section, field). Top-level fields use section None.
_SECTIONS = {
    "model": ModelConfig,
    "preprocess": PreprocessConfig,
    "train": TrainConfig,
    "trigger": TriggerConfig,
    "serve": ServeConfig,
    "active": ActiveConfig,
}
FLAG_MAP: dict[str, tuple[str | None, str]] = {
    "dataset": (None, "dataset"),
    "workdir": (None, "workdir"),
    "models_dir": (None, "models_dir"),
    "exports_dir": (None, "exports_dir"),
    "classes": (None, "classes_file"),
    "import_masks": (None, "import_masks"),
    "host": (None, "host"),
    "port": (None, "port"),
    "author": (None, "author"),
    "arch": ("model", "arch"),
    "encoder": ("model", "encoder"),
    "encoder_weights": ("model", "encoder_weights"),
    "max_side": ("preprocess", "max_side"),
    "steps": ("train", "steps"),
    "first_round_steps": ("train", "first_round_steps"),
    "minutes": ("train", "max_round_seconds"),
    "device": ("train", "device"),
    "threads": ("train", "threads"),
    "seed": ("train", "seed"),
    "serve_device": ("serve", "device"),
}


def _coerce(value: Any, current: Any, name: str) -> Any:
    if value is None or isinstance(value, Path):
        return value
    if isinstance(current, bool):
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        return bool(value)
    if isinstance(current, int) and not isinstance(current, bool):
        return int(value)
    if isinstance(current, float):
        return float(value)
    if isinstance(current, tuple):
        if isinstance(value, str):
            value = [float(v) for v in value.split(",")]
        return tuple(float(v) for v in value)
    if isinstance(current, Path) or name in ("dataset", "workdir", "classes_file", "import_masks", "image_root"):
        return Path(value)
    if isinstance(value, str) and value.strip().lower() in ("none", ""):
        return None
    return value


def project_name(dataset: Path | None) -> str:
    """A stable, readable project name: folder name plus a short hash of its absolute path."""
    if dataset is None:
        return "demo"
    resolved = dataset.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
    return f"{resolved.name or 'root'}-{digest}"


def _writable(path: Path) -> bool:
    """Writable by us and not marked read-only (root passes ``os.access``, so the mode bits are checked too)."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    return os.access(probe, os.W_OK) and bool(probe.stat().st_mode & 0o222)


def default_workdir(dataset: Path, project: str, env: Mapping[str, str]) -> Path:
    """``DIR/.labelsmart`` where the data set folder is writable, else a per-user data folder."""
    inside = dataset / ".labelsmart"
    if _writable(dataset):
        return inside
    base = Path(env.get("XDG_DATA_HOME") or Path(env.get("HOME", ".")) / ".local" / "share")
    return base / "labelsmart" / "projects" / project


def image_root_for(dataset: Path) -> Path:
    """A folder in the shared layout (``images/`` + ``classes.json`` or ``masks/``) lists from ``images/``."""
    images = dataset / "images"
    if images.is_dir() and ((dataset / "classes.json").is_file() or (dataset / "masks").is_dir()):
        return images
    return dataset


def load(args: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from defaults, ``LABELSMART_*`` variables and flags (flags win).

    Args:
        args: flat flag values, keys as in :data:`FLAG_MAP` (``None`` values are ignored). Keys of the
            form ``"section.field"`` (for example ``"train.steps"``) reach any field directly.
        env: environment; ``os.environ`` when omitted.

    Returns:
        The frozen configuration, with project paths resolved.
    """
    env = dict(os.environ if env is None else env)
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    defaults = Config()

    def put(section: str | None, name: str, value: Any) -> None:
        if section is None:
            current = getattr(defaults, name)
            top[name] = _coerce(value, current, name)
        else:
            current = getattr(getattr(defaults, section), name)
            if section == "train" and name == "max_round_seconds":
                value = float(value) * 60.0  # the flag is --minutes
            sections[section][name] = _coerce(value, current, name)

    for key, value in env.items():
        if not key.startswith("LABELSMART_") or value == "":
            continue
        rest = key[len("LABELSMART_") :].lower()
        for section in _SECTIONS:
            if rest.startswith(section + "_"):
                name = rest[len(section) + 1 :]
                if name in {f.name for f in dataclasses.fields(_SECTIONS[section])}:
                    current = getattr(getattr(defaults, section), name)
                    sections[section][name] = _coerce(value, current, name)
                break
        else:
            if rest in {f.name for f in dataclasses.fields(Config)} and rest not in _SECTIONS:
                top[rest] = _coerce(value, getattr(defaults, rest), rest)

    for key, value in (args or {}).items():
        if value is None:
            continue
        if "." in key:
            section, name = key.split(".", 1)
            current = getattr(getattr(defaults, section), name)
            sections[section][name] = _coerce(value, current, name)
        elif key in FLAG_MAP:
            put(*FLAG_MAP[key], value)

    built = {name: dataclasses.replace(getattr(defaults, name), **vals) for name, vals in sections.items()}
    cfg = dataclasses.replace(defaults, **top, **built)
    # The registry records where each version's files are; an absolute folder keeps them found when the project
    # is opened from another working directory (a relative "models" would be read against each one in turn).
    cfg = dataclasses.replace(cfg, models_dir=Path(cfg.models_dir).expanduser().resolve())

    dataset = cfg.dataset
    if dataset is not None:
        dataset = dataset.expanduser()
        project = project_name(dataset)
        image_root = cfg.image_root or image_root_for(dataset)
        workdir = cfg.workdir or default_workdir(dataset, project, env)
        classes_file = cfg.classes_file
        if classes_file is None and (dataset / "classes.json").is_file():
            classes_file = dataset / "classes.json"
        cfg = dataclasses.replace(
            cfg, dataset=dataset, project=project, image_root=image_root, workdir=workdir, classes_file=classes_file
        )
    return cfg
