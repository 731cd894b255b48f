"""Typed, validated views of ``params.yaml``: the single source of defaults, bounds and messages.

Every section is a pydantic model (``extra="forbid"``, strict types): an
unknown section or key, a value of the wrong type or out of range fails with
one line that names the key, the value given and what is allowed, plus the
closest allowed keys for a typo. :func:`load` validates the whole file,
sections and cross-section rules together; the ``preflight`` stage runs it
before every ``dvc repro`` does any work, even when DVC would skip every stage.

YAML note: PyYAML reads ``1e-4`` (no dot) as a string, DVC (YAML 1.2) as a
number. :func:`read_yaml` reads numbers the way DVC does, so both agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from transferlab.validation import (  # noqa: F401 - re-exported: config is where callers look
    CLOSE_CUTOFF, CLOSE_MATCHES, ParamsError, Section, _problem, parse, parse_section, read_yaml,
)
from transferlab.config_compute import (  # noqa: F401 - re-exported: config is where callers look
    DEVICE_FORMS, DEVICE_PATTERN, ENDPOINT_PATTERN, ComputeParams, DistributedParams,
)

PARTS = ("train", "val", "test")
# What torchvision's ImageFolder reads (torchvision.datasets.folder.IMG_EXTENSIONS; a test keeps them
# equal). One set for `data get`, ingest and predict: kept here so data code never imports torchvision.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SEED_MAX = 2**32 - 1  # numpy's seed range


# ------------------------------------------------------------------------------------ sections


class DataParams(Section):
    """Where ``make demo`` gets ``data/raw`` from when it is absent."""

    source: str = "builtin:lfw-faces"
    sha256: str | None = None


class IngestParams(Section):
    max_side: int = Field(384, ge=32)  # shorter side cap in pixels; backbones resize to 224-342
    min_per_class: int = Field(5, ge=1)
    max_pixels: int = Field(64_000_000, gt=0)  # decompression-bomb guard
    max_file_mb: float = Field(200.0, gt=0)
    # accepted file extensions (case-insensitive); None accepts every format Pillow decodes
    extensions: list[str] | None = Field(default_factory=lambda: list(IMAGE_EXTENSIONS))
    # decoding processes; None: the cores this process may use. Outputs do not depend on it.
    workers: int | None = Field(None, ge=1)
    # near-duplicates: pHash (64 bits) distance up to which two images are one group; null: exact duplicates only
    near_dup_distance: int | None = Field(8, ge=0, le=32)
    near_dup_mirror: bool = True  # a mirrored copy is a near-duplicate too

    @model_validator(mode="after")
    def _dotted(self) -> IngestParams:
        if not all(e.startswith(".") for e in self.extensions or []):
            raise _problem("extensions", self.extensions, "null or a list like ['.jpg', '.png']")
        return self

    def deciding(self) -> dict[str, Any]:
        """The params that decide ingest's outputs (all but ``workers``): what its report records."""
        return self.model_dump(exclude={"workers"})

    def suffixes(self) -> frozenset[str] | None:
        """Lower-case accepted suffixes; None: every format Pillow reads."""
        return None if self.extensions is None else frozenset(e.lower() for e in self.extensions)


class SplitParams(Section):
    ratios: dict[str, float] = Field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    seed: int = Field(42, ge=0, le=SEED_MAX)
    respect_folders: bool = True
    # dataset folder -> part; e.g. {val: test} holds a dataset's val folder out for testing
    folders: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _parts(self) -> SplitParams:
        for folder, part in self.folders.items():
            if folder not in PARTS or part not in PARTS:
                raise _problem(f"folders.{folder}", part, f"keys and values among {', '.join(PARTS)}")
        if set(self.ratios) != set(PARTS):
            raise _problem("ratios", sorted(self.ratios), f"exactly the keys {', '.join(PARTS)}")
        if not (all(0 <= v < 1 for v in self.ratios.values()) and self.ratios["train"] > 0):
            raise _problem("ratios", self.ratios, "each ratio in [0, 1), train > 0")
        total = sum(self.ratios.values())
        if abs(total - 1.0) > 1e-6:
            raise _problem("ratios", self.ratios, f"ratios that sum to 1 (these sum to {total:g})")
        return self


class ExtractParams(Section):
    """Which frozen backbones to run, and how."""

    backbones: list[str] = Field(default_factory=lambda: ["efficientnet_lite0"], min_length=1)
    # per-backbone weights enum name, e.g. {resnet18: ResNet18_Weights.IMAGENET1K_V1}
    weights: dict[str, str] = Field(default_factory=dict)
    # per-backbone local state dict, for machines without internet
    weights_path: dict[str, str] = Field(default_factory=dict)
    batch_size: int = Field(32, ge=1)
    keep_maps: bool = True

    @model_validator(mode="after")
    def _names(self) -> ExtractParams:
        if len(set(self.backbones)) != len(self.backbones):
            raise _problem("backbones", self.backbones, "unique names")
        for key in ("weights", "weights_path"):
            extra = sorted(set(getattr(self, key)) - set(self.backbones))
            if extra:
                raise _problem(key, getattr(self, key), f"keys among extract.backbones {self.backbones}")
        return self


ClassWeight = Literal[None, "balanced"]


class TorchHeadParams(Section):
    """What every torch head trained on cached maps shares."""

    dropout: float = Field(0.0, ge=0, lt=1)
    lr: float = Field(1e-3, gt=0, le=1)
    weight_decay: float = Field(1e-2, ge=0)
    max_epochs: int = Field(100, ge=1)
    batch_size: int = Field(64, ge=1)
    patience: int = Field(10, ge=1)
    # the least fall of the val loss (nats per image) that counts as an improvement for early stopping:
    # on an easy split the loss creeps down by 1e-5 an epoch long after every val image is right
    min_delta: float = Field(1e-3, ge=0)
    class_weight: ClassWeight = None
    random_state: int = Field(0, ge=0, le=SEED_MAX)


class LinearHeadParams(TorchHeadParams):
    """Flatten -> Dense(hidden, ReLU) -> Dropout -> Dense; hidden 0 = one linear layer."""

    dropout: float = Field(0.5, ge=0, lt=1)
    lr: float = Field(3e-5, gt=0, le=1)  # thousands of flattened inputs: a small step, or it overfits at once
    max_epochs: int = Field(50, ge=1)
    hidden: int = Field(256, ge=0)


class GapHeadParams(TorchHeadParams):
    """Global average pooling -> Dropout -> Dense."""


class SvmHeadParams(Section):
    """Standardized pooled vectors -> LinearSVC; C_grid chooses C by CV on train."""

    C: float = Field(1.0, gt=0)
    C_grid: list[float] | None = Field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    cv: int = Field(5, ge=2)
    class_weight: ClassWeight = None
    max_iter: int = Field(5000, ge=1)
    # liblinear's own defaults are 0.1 (dual) and 0.01 (primal); scikit-learn's 1e-4 is far stricter.
    # On real efficientnet_lite0 features (12 classes, bench/heads.py --pipeline) 0.01 left every val
    # prediction as 1e-4 did, moved decision values by < 0.007 and ran 2.5-3x fewer iterations.
    tol: float = Field(0.01, gt=0)
    calibrate: bool = True
    random_state: int = Field(0, ge=0, le=SEED_MAX)

    @model_validator(mode="after")
    def _grid(self) -> SvmHeadParams:
        if self.C_grid is not None and (not self.C_grid or any(c <= 0 for c in self.C_grid)):
            raise _problem("C_grid", self.C_grid, "null (use C) or a non-empty list of numbers > 0")
        return self

    def check_folds(self, class_counts: Mapping[str, int], key: str) -> None:
        """Stratified ``cv`` folds need at least ``cv`` training images in every class."""
        if self.C_grid is None and not self.calibrate:
            return  # no cross-validation at all
        label, fewest = min(class_counts.items(), key=lambda item: (item[1], item[0]))
        if self.cv > fewest:
            raise ParamsError(f"{key}.cv: got {self.cv}; allowed: 2 to {fewest}, the train images of the "
                              f"smallest class ({label!r}): stratified folds need one image of each class")


HEADS = ("linear", "gap", "svm")  # the head kinds to train (and evaluate) by default: train_head.kinds


class TrainHeadParams(Section):
    """``kinds``: the heads to train; ``<name>``: each registered head's section, parsed by its spec's model."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)  # head sections: the registry's
    kinds: list[str] = Field(default_factory=lambda: list(HEADS), min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _heads(cls, raw: Any) -> Any:
        from transferlab.models.heads import registry  # torch-free; imported here as it imports this module
        return registry.parse_sections(raw, "train_head") if isinstance(raw, Mapping) else raw

    def head(self, kind: str) -> Any:
        from transferlab.models.heads.registry import spec  # ParamsError naming the registered heads
        return getattr(self, spec(kind).name)


class AugmentParams(Section):
    """Training-time augmentation for fine-tuning (eval uses the deterministic transform)."""

    random_resized_crop: bool = True
    scale: list[float] = Field(default_factory=lambda: [0.08, 1.0])
    hflip: bool = True

    @model_validator(mode="after")
    def _scale(self) -> AugmentParams:
        if not (len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1):
            raise _problem("scale", self.scale, "[min, max] with 0 < min <= max <= 1")
        return self


STRATEGIES = ("head_only", "last_blocks", "full")
AUTO = "auto"  # finetune.strategy: auto takes the probe stage's recommendation (reports/probe/<backbone>.json)


class FinetuneParams(Section):
    """Fine-tune a pretrained backbone with a new (or warm-started) head."""

    backbones: list[str] = Field(default_factory=lambda: ["efficientnet_lite0"], min_length=1)
    # auto: the probe stage's recommendation (transferlab.probe); model.json records what it chose and why
    strategy: Literal["head_only", "last_blocks", "full", "auto"] = "last_blocks"
    last_blocks: int = Field(2, ge=1)  # strategy last_blocks: the top N named blocks train (auto ignores it)
    init: Literal["new", "best_head"] = "new"
    dropout: float = Field(0.2, ge=0, lt=1)
    lr: float = Field(1e-3, gt=0, le=1)  # the head's learning rate
    # backbone lr = lr * factor: small, or fine-tuning destroys what the backbone knows
    backbone_lr_factor: float = Field(0.1, gt=0, le=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: int = Field(1, ge=0)
    max_epochs: int = Field(10, ge=1)
    patience: int = Field(3, ge=1)
    monitor: Literal["val_loss", "val_accuracy"] = "val_loss"
    batch_size: int = Field(32, ge=1)
    class_weight: ClassWeight = None
    augment: AugmentParams = Field(default_factory=AugmentParams)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    # mixed precision where the hardware computes it natively (transferlab.device.autocast_dtype); false: float32
    autocast: bool = True

    @model_validator(mode="after")
    def _warmup(self) -> FinetuneParams:
        if self.warmup_epochs >= self.max_epochs:
            raise _problem("warmup_epochs", self.warmup_epochs, f"0 to max_epochs - 1 ({self.max_epochs - 1})")
        return self


class EvaluateParams(Section):
    """Test-split evaluation; the champion is chosen on validation figures only."""

    n_boot: int = Field(2000, ge=100)  # bootstrap resamples for the accuracy interval
    ci: float = Field(0.95, gt=0, lt=1)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    ece_bins: int = Field(15, ge=2)
    select_by: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    registered_model: str = Field("transferlab", min_length=1, pattern=r"\S")
    tta: list[Literal["hflip"]] = Field(default_factory=list)  # views averaged with the plain one: "+tta" rows
    gallery: int = Field(8, ge=1, le=100)  # top-loss test images per model in reports/index.html

    @model_validator(mode="after")
    def _tta(self) -> EvaluateParams:
        if len(set(self.tta)) != len(self.tta):
            raise _problem("tta", self.tta, "unique view names, or [] for none")
        return self


class LabelIssueParams(Section):
    """Likely label errors: out-of-fold probabilities of a logistic regression on pooled vectors, then cleanlab."""

    cv: int = Field(5, ge=2)  # folds of the out-of-fold probabilities (stratified, on train + val)
    C: float = Field(1.0, gt=0)  # the logistic regression's inverse regularization (standardized vectors)
    top: int = Field(20, ge=1)  # suspects listed, most likely first (cleanlab's self-confidence ranking)
    seed: int = Field(0, ge=0, le=SEED_MAX)


class AuditParams(Section):
    """The audit after extract: leaks across split parts and likely label errors, from the cached vectors."""

    backbone: str | None = None  # the feature store audited; null: the first of extract.backbones
    # cosine similarity of pooled vectors from which a pair across parts is a likely leak. On hymenoptera
    # (efficientnet_lite0): distinct photos at most 0.81; 5-10% crops of one photo 0.89-0.98, mirrored 0.88-0.97
    leak_threshold: float = Field(0.85, gt=0, le=1)
    sheet_rows: int = Field(20, ge=1)  # pairs / images drawn on each thumbnail sheet (all are in audit.json)
    label_issues: LabelIssueParams = Field(default_factory=LabelIssueParams)


class ProbeParams(Section):
    """The probe stage: a linear probe per backbone block, two dataset measures, and a strategy.

    Small or large: train images in the smallest class against ``large_per_class``. Like ImageNet
    or not: the mean top-1 probability of the backbone's own ImageNet classifier over the train and
    val images (its confidence that the photo shows an ImageNet class) against ``similar_above``.
    """

    large_per_class: int = Field(1000, ge=1)  # train images in the smallest class at or above which data is large
    similar_above: float = Field(0.5, gt=0, lt=1)  # mean ImageNet top-1 probability at or above which data is similar
    # val accuracy within this of the best block counts as as good as the best (the curve's plateau)
    tolerance: float = Field(0.02, ge=0, lt=1)
    C_grid: list[float] = Field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0])  # chosen by CV on train
    cv: int = Field(3, ge=2)
    max_iter: int = Field(1000, ge=10)
    n_boot: int = Field(1000, ge=100)  # bootstrap resamples for each block's val accuracy interval
    ci: float = Field(0.95, gt=0, lt=1)
    seed: int = Field(0, ge=0, le=SEED_MAX)

    @model_validator(mode="after")
    def _grid(self) -> ProbeParams:
        if not self.C_grid or any(c <= 0 for c in self.C_grid):
            raise _problem("C_grid", self.C_grid, "a non-empty list of numbers > 0")
        return self


class Params(Section):
    """The whole params.yaml: every section, and the rules that span sections."""

    data: DataParams = Field(default_factory=DataParams)
    ingest: IngestParams = Field(default_factory=IngestParams)
    split: SplitParams = Field(default_factory=SplitParams)
    extract: ExtractParams = Field(default_factory=ExtractParams)
    train_head: TrainHeadParams = Field(default_factory=TrainHeadParams)
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)
    audit: AuditParams = Field(default_factory=AuditParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    probe: ProbeParams = Field(default_factory=ProbeParams)
    compute: ComputeParams = Field(default_factory=ComputeParams)
    distributed: DistributedParams = Field(default_factory=DistributedParams)

    @model_validator(mode="after")
    def _across(self) -> Params:
        world = self.distributed.world_size
        if self.finetune.batch_size % world:
            # finetune.batch_size is the global batch: each rank takes batch_size / world of it
            raise _problem("finetune.batch_size", self.finetune.batch_size,
                           f"a multiple of the world size distributed.nproc_per_node x nnodes ({world}): "
                           "the global batch is split evenly over the ranks")
        outside = [b for b in self.finetune.backbones if b not in self.extract.backbones]
        if outside:
            # finetune reads that backbone's cached-feature heads (init, comparison); they come from extract
            raise _problem("finetune.backbones", self.finetune.backbones,
                           f"names among extract.backbones {self.extract.backbones}; add {outside} there too")
        if self.audit.backbone is not None and self.audit.backbone not in self.extract.backbones:
            raise _problem("audit.backbone", self.audit.backbone,
                           f"null or a name among extract.backbones {self.extract.backbones}")
        return self

    def audited_backbone(self) -> str:
        """The feature store the audit reads: ``audit.backbone``, else the first of ``extract.backbones``."""
        return self.audit.backbone or self.extract.backbones[0]


SECTIONS: dict[str, type[Section]] = {
    name: info.annotation for name, info in Params.model_fields.items()  # type: ignore[misc]
}


# ------------------------------------------------------------------------------------ files


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """The raw mapping of a params file (numbers read as DVC reads them)."""
    try:
        raw = read_yaml(path) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path} not found: run from the project root, where params.yaml is") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: got {type(raw).__name__} at the top level; allowed: a mapping of sections")
    return raw


def load(path: str | Path = "params.yaml") -> Params:
    """The whole params file, every section and the cross-section rules validated."""
    return parse(Params, load_params(path))


def section(name: str, path: str | Path = "params.yaml") -> Any:
    """One validated section of ``params.yaml`` (the whole file is validated with it)."""
    if name not in SECTIONS:
        raise ParamsError(f"unknown section {name!r}; allowed: {', '.join(SECTIONS)}")
    return getattr(load(path), name)


def as_dict(params: BaseModel) -> dict[str, Any]:
    return params.model_dump()
