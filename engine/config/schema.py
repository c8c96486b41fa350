"""The config's schema: one dataclass per section, the types and defaults every key has, and nothing else.

This module reads no registry and builds nothing: loading (engine/config/loading.py) makes these from YAML and
`key=value` overrides, resolution (resolve.py) settles every `auto`, checks (checks.py) refuse what cannot run.

A method (peers.NAME.ssl) or a data backend (data.backend) with settings of its own has them here as a sub-section
named after it (peers.r18.mocov2.queue_size, data.ffcv.beton), marked SECTION; the method or backend reads them
from its peer's or the data's config (tests/test_config.py checks each names a registered method or backend).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

SECTION = {"section": True}  # field metadata: a method's or a backend's own settings
MAY_BE_EMPTY = {"may_be_empty": True}  # field metadata: a mapping of name -> settings that may have no entry


def section(settings: type) -> Any:
    """A method's or a backend's settings sub-section: its defaults unless the config sets it."""
    return field(default_factory=settings, metadata=SECTION)


def section_names(cls: type) -> list[str]:
    """The sub-sections of a dataclass (peers' methods, data's backends)."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("section")]


# -- the data backends' own settings (data.<backend>) -------------------------------------------------------------

@dataclass
class FFCVSettings:
    beton: str = ""  # the training split as a .beton (dogo convert); evaluation still reads data.path
    order: Literal["random", "quasi_random"] = "random"  # quasi_random reads the file in shuffled blocks
    os_cache: bool = True  # read through the OS page cache (False: FFCV's own process cache)
    image_field: str = "image"  # the .beton's RGB image field (stock FFCV scripts may write e.g. 'img')
    label_field: str = "label"  # its integer label field (e.g. 'target')


@dataclass
class DALISettings:
    hw_decoder_load: float = 0.65  # on a GPU: share of the JPEGs given to the hardware decoder
    # before the first batch every file is checked (DALI can crash or train on garbage on a broken file).
    # whole: every byte read and every JPEG decoded at 1/8 scale in processes (corrupt data found, also what breaks
    # no structure); ends: the first 64 kB and the last bytes, nothing decoded (truncation and declared size only: a
    # much faster start on a dataset already checked, e.g. by dogo convert)
    scan: Literal["whole", "ends"] = "whole"


@dataclass
class SyntheticSettings:
    images: int = 2048  # dataset size (random pixels, for speed tests)


@dataclass
class DataConfig:
    # where batches of views come from: a registered backend (dogo.core.registry.BACKENDS); its own settings are the
    # sub-section named after it, e.g. data.ffcv.beton, data.dali.scan
    backend: str = "folder"
    # the dataset root, one folder per split, each class_name/image.jpg (ImageNet's layout: train/, val/); held: that,
    # or CIFAR's cifar-10-batches-py / cifar-100-python folder (its test batch is the val split)
    path: str = "data/shapes64"
    train_split: str = "train"  # the split folder SSL trains on (and the kNN bank and probes' training images)
    val_split: str = "val"  # labelled split the kNN monitor queries
    # folders: the training split's class folders name the labels (ImageFolder's layout); none: every image at any
    # depth under the training split, unlabelled (folder and dali backends; ffcv: a .beton converted with --labels
    # none); evaluation then needs a labelled dataset named on its command line
    labels: Literal["folders", "none"] = "folders"
    # side of each training view, pixels. auto: from the training images' median shorter side (read from a sample of
    # their headers): 32 up to 48 px (CIFAR-like), 64 up to 128 px, else 96 on a CPU and 224 on a GPU
    image_size: Union[Literal["auto"], int] = 64
    batch_size: int = 256  # images per step over all ranks (each image yields two views per peer)
    workers: int = 4  # decoding processes per rank; 0 decodes in the training process
    ffcv: FFCVSettings = section(FFCVSettings)  # the ffcv backend's settings
    dali: DALISettings = section(DALISettings)  # the dali backend's settings
    synthetic: SyntheticSettings = section(SyntheticSettings)  # the synthetic backend's settings


# -- the SSL methods' own settings (peers.NAME.<method>) ---------------------------------------------------------

@dataclass
class MoCoV2Settings:
    momentum: float = 0.999  # key encoder EMA momentum (at the start, with the cosine schedule)
    momentum_schedule: Literal["constant", "cosine"] = "constant"  # cosine: from `momentum` to 1 over the run
    queue_size: int = 65536  # negatives kept; starts as random unit keys (seeded), as MoCo's does
    # false is MoCo v2's own loss (view-1 queries against view-2 keys; every rank's view-2 keys enqueued).
    # true averages both directions and enqueues both views' keys (the queue turns over twice as fast).
    symmetric: bool = False


@dataclass
class SimSiamSettings:
    pred_hidden: int = 512  # hidden width of the predictor (SimSiam's bottleneck)


@dataclass
class BYOLSettings:
    pred_hidden: int = 4096  # hidden width of the predictor (BYOL's 4096-256 MLP)
    momentum: float = 0.996  # target network EMA momentum at the start (BYOL's tau_base)
    momentum_schedule: Literal["constant", "cosine"] = "cosine"  # cosine: from `momentum` to 1 over the run


@dataclass
class VICRegSettings:
    sim_coeff: float = 25.0  # lambda: the invariance (mean squared distance between the views' embeddings)
    std_coeff: float = 25.0  # mu: the variance hinge (each dimension's std over the global batch at least 1)
    cov_coeff: float = 1.0  # nu: the covariance (off-diagonal covariances over the global batch towards 0)
    eps: float = 1e-4  # inside the std's square root


@dataclass
class BarlowTwinsSettings:
    lambd: float = 0.0051  # weight of the off-diagonal (redundancy) terms of the cross-correlation


@dataclass
class DINOSettings:
    prototypes: int = 65536  # K, the outputs of the weight-normalised last layer (DINO's out_dim)
    norm_last_layer: bool = True  # the last layer's weight norm fixed at 1 (DINO's default; false trains it)
    momentum: float = 0.996  # the teacher's EMA momentum at the start ...
    momentum_schedule: Literal["constant", "cosine"] = "cosine"  # ... cosine: to 1 over the run (DINO's)
    center_momentum: float = 0.9  # EMA of the teacher's mean output, subtracted before its softmax (centring)
    student_temp: float = 0.1  # the student's softmax temperature
    teacher_temp: float = 0.04  # the teacher's temperature after its warm-up (DINO: 0.04, up to 0.07 for long runs)
    warmup_teacher_temp: float = 0.04  # its temperature in epoch 0, rising linearly (per epoch) ...
    warmup_teacher_temp_epochs: int = 0  # ... to teacher_temp over these epochs (DINO's ViT-S: 0.04 -> 0.07 in 30)
    freeze_last_layer_epochs: int = 1  # the last layer takes no update for these first epochs (DINO's 1)


@dataclass
class AugmentConfig:
    """The SimCLR recipe (docs/algorithms.md); every random parameter is drawn per image."""
    # where the recipe after the crop runs: device (batched, on the training device), workers (per image in uint8 in
    # the loader's worker processes or threads; folder and ffcv backends), auto: device on CUDA, workers on CPUs
    place: Literal["auto", "device", "workers"] = "auto"
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio
    flip_p: float = 0.5  # horizontal flip probability
    jitter_p: float = 0.8  # colour jitter probability; its four operations in a random order per image
    brightness: float = 0.4  # colour jitter strengths (torchvision's ColorJitter): brightness ...
    contrast: float = 0.4  # ... contrast ...
    saturation: float = 0.4  # ... saturation ...
    hue: float = 0.1  # ... and hue (at most 0.5)
    grayscale_p: float = 0.2  # grayscale probability
    # Gaussian blur probability: 0 for 32 px images, as SimCLR does on CIFAR; auto: 0 for views up to 32 px, else 0.5
    blur_p: Union[Literal["auto"], float] = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # Gaussian blur sigma range, drawn per image
    blur_kernel_fraction: float = 0.1  # kernel side as a fraction of the view side (made odd)
    solarize_p: float = 0.0  # solarisation probability
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # normalisation mean (ImageNet's)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # normalisation standard deviation (ImageNet's)


@dataclass
class RecipeOverrides:
    """augment.* numbers that differ for a group of views or for one view of it; null keeps augment's."""
    crop_scale: Optional[tuple[float, float]] = None  # RandomResizedCrop area fraction (DINO's local crops: 0.05-0.4)
    crop_ratio: Optional[tuple[float, float]] = None  # RandomResizedCrop aspect ratio
    flip_p: Optional[float] = None  # horizontal flip probability
    jitter_p: Optional[float] = None  # colour jitter probability
    brightness: Optional[float] = None  # colour jitter strengths: brightness ...
    contrast: Optional[float] = None  # ... contrast ...
    saturation: Optional[float] = None  # ... saturation ...
    hue: Optional[float] = None  # ... and hue
    grayscale_p: Optional[float] = None  # grayscale probability
    blur_p: Optional[float] = None  # Gaussian blur probability (DINO: 1.0 on global view 0, 0.1 on view 1)
    blur_sigma: Optional[tuple[float, float]] = None  # Gaussian blur sigma range
    solarize_p: Optional[float] = None  # solarisation probability (DINO: 0.2 on global view 1)


@dataclass
class ViewGroup:
    count: int = 2  # views of each image in this group (per peer's set of views)
    # side of the group's views, px; null: data.image_size (the first group's must be data.image_size: the models'
    # input and the evaluation size)
    size: Optional[int] = None
    recipe: RecipeOverrides = field(default_factory=RecipeOverrides)  # what differs from augment for every view here
    # per view of the group, by its index 0 .. count-1: what differs from the group's recipe for that view alone
    view_recipe: dict[str, RecipeOverrides] = field(default_factory=dict, metadata=MAY_BE_EMPTY)


@dataclass
class PeerConfig:
    # a registered backbone (dogo.core.registry.BACKBONES: resnet18, ...), or timm:<name>, any timm model (the timm extra)
    arch: str = "resnet18"
    arch_args: dict[str, Any] = field(default_factory=dict)  # timm: passed to timm.create_model, e.g. {patch_size: 4}
    # 3x3 stride-1 first conv and no max-pool, for 32-64 px images; auto: on a GPU, on for views of 64 px or less
    # where the backbone has the stem; on a CPU off (the standard stem: 10x faster steps at 32 px)
    cifar_stem: Union[Literal["auto"], bool] = False
    zero_init_residual: bool = False  # ResNets: each block's last BN starts at zero scale (SimCLR's init)
    # the projection head: hidden width, output (embedding) size, Linear layers; None takes the method's paper
    # default (simclr, mocov2, simsiam 2048-128 in 2 layers; byol 4096-256; vicreg, barlowtwins 8192-8192-8192;
    # dino 2048-2048-256, GELU without BN, before its prototypes)
    head_hidden: Optional[int] = None
    head_out: Optional[int] = None  # the embedding size (see head_hidden)
    head_layers: Optional[int] = None  # Linear layers: Linear-BN-ReLU blocks, then a Linear (see head_hidden)
    # The peer's own SSL method (dogo.core.registry.METHODS). None: the objective's method when it names one
    # (objective.name=simclr, mocov2, ...), else simclr.
    ssl: Optional[str] = None
    tau: Optional[float] = None  # NT-Xent / InfoNCE temperature; None: the method's default (simclr 0.1, mocov2 0.2)
    kl_weight: float = 1.0  # DoGo lambda_k on KL(P_peer || P_k), per-row mean ('batchmean')
    lr: Optional[float] = None  # per 256 images; None takes optim.lr
    weight_decay: Optional[float] = None  # None takes optim.weight_decay
    mocov2: MoCoV2Settings = section(MoCoV2Settings)  # mocov2's settings (peers.NAME.ssl=mocov2)
    simsiam: SimSiamSettings = section(SimSiamSettings)  # simsiam's settings
    byol: BYOLSettings = section(BYOLSettings)  # byol's settings
    vicreg: VICRegSettings = section(VICRegSettings)  # vicreg's settings
    barlowtwins: BarlowTwinsSettings = section(BarlowTwinsSettings)  # barlowtwins' settings
    dino: DINOSettings = section(DINOSettings)  # dino's settings


@dataclass
class ObjectiveConfig:
    # a method's name (simclr, mocov2, simsiam): every peer learns alone with it. dogo: two peers, each with its own
    # method (peers.X.ssl) plus the KL to the other. disco: students distilled from a frozen `teacher`.
    name: str = "dogo"
    tau_kl: float = 0.1  # temperature of the cross-view similarity softmax in the DoGo KL term
    # disco: weight of the squared distance to the teacher's embedding, summed over both views, the dimensions and
    # this rank's images: DisCo's MSELoss(reduction='sum') per GPU, weight 1 (its 256 images on 8 GPUs: 32 per
    # GPU). The pull therefore grows with the per-rank batch b: to keep DisCo's strength at b, use 32 / b.
    distill_weight: float = 1.0
    # disco: what the student is pulled towards. embedding: the teacher's final embedding (DisCo). prototypes: a DINO
    # teacher's softmax over its prototypes, centred (a running mean of its scores) and at the student's
    # dino.teacher_temp, as the target of a DINO student's softmax over as many prototypes: a cross-entropy, mean
    # over the rows (the DINOv2 distillation recipe)
    distill_target: Literal["embedding", "prototypes"] = "embedding"
    share_views: bool = False  # dogo: both peers see the same two views (half the decoding and augmentation)
    # images per tile of the contrastive kernel (rows and columns); its blocks grow as tile^2. auto: on CUDA the
    # largest power of two whose blocks take at most an eighth of the free memory (few tiles, few launches), 1024
    # on CPUs
    tile: Union[Literal["auto"], int] = "auto"


@dataclass
class TeacherConfig:
    """DisCo's frozen teacher: a peer of a dogo run or a solo-learn or lightly run (checkpoint), or plain state_dict
    files (backbone + head)."""
    # a dogo checkpoint file or run folder (its newest checkpoint), or a solo-learn or lightly Lightning checkpoint
    # (.ckpt: its backbone and projection head, with teacher.arch; a 3x3 first conv is the library's CIFAR stem)
    checkpoint: str = ""
    peer: str = ""  # which peer of a dogo checkpoint; empty: its only peer
    backbone: str = ""  # or: a torchvision-format backbone state_dict (classifier keys are ignored) ...
    head: str = ""  # ... and its projection head's state_dict (sizes are read from it)
    # with backbone/head files or a Lightning checkpoint: the backbone's name, e.g. resnet50 or
    # timm:vit_small_patch16_224
    arch: str = ""
    arch_args: dict[str, Any] = field(default_factory=dict)  # with a timm arch: its timm.create_model arguments
    cifar_stem: bool = False  # with backbone/head files (a Lightning checkpoint's 3x3 first conv says so itself)
    # a solo-learn or lightly head's activation, which its checkpoint does not record: relu (their SimCLR, MoCo, BYOL,
    # SimSiam, VICReg, Barlow Twins, NNCLR, SwAV heads) or gelu (lightly's MSN and LeWM, solo-learn's VIbCReg)
    head_activation: Literal["relu", "gelu"] = "relu"
    # eval: BatchNorm with the teacher's running statistics (our default). batch: each view's batch statistics, as
    # DisCo's code (model.train() on the teacher too), without updating the running statistics.
    bn: Literal["eval", "batch"] = "eval"


@dataclass
class OptimConfig:
    name: Literal["lars", "sgd", "adamw"] = "lars"  # fused on CUDA, foreach on CPUs
    lr: float = 0.3  # learning rate per 256 images; scaled linearly by the global batch
    weight_decay: float = 1e-6  # never applied to biases and norm parameters
    momentum: float = 0.9  # lars and sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    eps: float = 1e-8  # adamw
    trust_coefficient: float = 0.001  # lars eta
    clip_grad_norm: float = 0.0  # max global grad norm; 0 turns clipping off


@dataclass
class ScheduleConfig:
    epochs: int = 100  # passes over the training split
    warmup_epochs: float = 10.0  # linear warm-up from 0, then cosine to final_lr_ratio x lr
    final_lr_ratio: float = 0.0  # the cosine's end as a fraction of the peak learning rate
    max_steps: int = 0  # if > 0, the run (and its schedule) is this many steps instead of `epochs`


@dataclass
class PrecisionConfig:
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto: on for CUDA
    # torch.compile (Triton on CUDA, C++ on CPUs; a compilation at the start, about a minute on CPUs). on: the
    # device recipe's whole chain fused (fewer passes over memory); peers: also each peer's forward (backbone and
    # head), the training step's many small launches fused. Off until a GPU run shows it faster.
    compile: Literal["off", "on", "peers"] = "off"
    # CUDA graphs: the training step (forward, loss, backward, optimiser, momentum encoders, online probe) captured
    # once after 3 eager steps and replayed, one launch in place of hundreds; its lr and momentum then live in device
    # tensors. For small views, where the host's launches set the pace (CIFAR's 32 px). CUDA and one process only
    # (not under torchrun, not with compile=peers). auto: off until a GPU run shows it faster (docs/gpu.md).
    cuda_graphs: Literal["auto", "on", "off"] = "auto"


@dataclass
class DistributedConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    sync_bn: bool = False  # batch statistics over all ranks (SimCLR's global BN)
    timeout_min: float = 30.0  # collective timeout, minutes: a rank that stops answering ends the run


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also at every epoch end; 0 means epoch ends only
    keep: int = 3  # newest checkpoints kept
    # latest: the newest checkpoint in the run folder, else a fresh start (auto means the same) | none: a fresh
    # start, earlier checkpoints set aside | a checkpoint path
    resume: str = "latest"


# eval.knn_protocol's presets: (k, temperature) of the weighted kNN
KNN_PROTOCOLS = {"dino": (20, 0.07), "lightly": (200, 0.1)}


@dataclass
class EvalConfig:
    knn_every_epochs: int = 1  # kNN monitor at epoch ends; 0 turns it off
    # the weighted kNN's k and temperature: dino (k=20, T=0.07: DINO's and solo-learn's), lightly (k=200, T=0.1:
    # lightly's CIFAR benchmark), or custom (set knn_k and knn_temperature); every kNN result names it
    knn_protocol: Literal["dino", "lightly", "custom"] = "dino"
    knn_k: Optional[int] = None  # set by the protocol unless custom
    knn_temperature: Optional[float] = None  # set by the protocol unless custom
    knn_bank_images: int = 0  # train images in the kNN feature bank; 0 takes the whole split
    # a linear classifier per peer on detached backbone features, trained beside SSL (its own SGD, momentum 0.9);
    # train top-1 in the log lines, val top-1 at every epoch end; the peers train bit-identically with it on or off
    online_probe: Literal["off", "on"] = "off"
    online_probe_lr: float = 0.1  # the online probe's SGD learning rate (constant)
    batch_size: int = 256  # per rank, for feature extraction


@dataclass
class LogConfig:
    every: int = 20  # steps between metric lines (the only host syncs in the hot loop)
    progress: Literal["auto", "on", "off"] = "auto"  # rich progress bar; auto: when stdout is a terminal
    # without the bar (a job log, nohup, CI): a line of step, epoch, images/s and ETA (host clock, no host sync)
    # whenever this many seconds pass without a line, also while a step or an evaluation takes longer; 0: none
    heartbeat_s: float = 30.0
    tensorboard: Literal["auto", "on", "off"] = "auto"  # event files in RUN/tb; auto: when tensorboard is installed
    # Weights & Biases (the wandb extra): the same scalars as TensorBoard and the resolved config; offline writes
    # RUN/wandb for `wandb sync` later, online needs `wandb login`; a resumed run continues the same W&B run
    wandb: Literal["off", "online", "offline"] = "off"
    wandb_project: str = "dogo"  # the W&B project the run goes to
    wandb_entity: str = ""  # the W&B team or user; empty: your default entity


@dataclass
class Config:
    name: str = "run"  # the run folder is out_dir/name
    out_dir: str = "runs"  # parent of the run folder
    seed: int = 0  # initial weights, data order and every augmentation parameter derive from it
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when torch sees a GPU
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # the views each image yields, as groups of one size, largest first: the first group holds the large (global)
    # crops that every method pairs, momentum encoders and DisCo's teacher see; later groups are smaller (local)
    # crops. A file that sets views states the whole plan (it replaces the base file's). Default: two views at
    # data.image_size
    views: dict[str, ViewGroup] = field(default_factory=lambda: {"global": ViewGroup()})
    peers: dict[str, PeerConfig] = field(default_factory=lambda: {"r18": PeerConfig()})
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

