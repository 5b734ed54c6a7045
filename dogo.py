"""Distill on the Go (DoGo): online knowledge distillation for self-supervised learning.

Bhat, Arani, Zonooz. "Distill on the Go: Online knowledge distillation in self-supervised
learning", CVPR 2021 workshop on Learning from Limited and Imperfect Data, arXiv:2104.09866.

Two networks learn from scratch at the same time, without labels: the student (--arch), the small network
DoGo is for, and its peer (--peer). Each solves SimCLR (or SimSiam) on its own two views of every image, and
learns to agree with the other on how similar the images of a batch are (mutual learning on similarities):

    L_k = SSL_k  +  lambda_k * KL( P_other || P_k )      (P: row-softmax of cross-view cosines)

Usage:
    python dogo.py --arch resnet18 --peer resnet50      # the paper's set-up: CIFAR-10, a GPU job
    python dogo.py --arch resnet18 --peer none          # the baseline: the student alone
    python dogo.py --dataset synthetic --arch wrn10_2 --peer wrn10_2 --img-size 16   # offline, on any CPU
    python dogo.py --resume runs/cifar10_resnet18_resnet50/checkpoint.pt --epochs 400
    python dogo.py --resume auto ...                    # the same command each time a cluster requeues the job
    torchrun --standalone --nproc_per_node=8 dogo.py --batch-size 256   # 8 GPUs, 32 images each
    python dogo.py --dataset synthetic --synthetic-size 50000 --max-steps 100   # the speed of a set-up

Outputs in --out-dir: metrics.csv, losses.png, checkpoint.pt; evaluate with eval_linear.py.
"""
import argparse
import contextlib
import csv
import dataclasses
import functools
import hashlib
import io
import math
import multiprocessing
import os
import signal
import sys
import time
from collections import namedtuple

# OpenMP's threads spin while they wait: on an idle CPU that is 1.4x faster here, on a busy one 1.3 to 2x slower
# (README, "Scale and speed"). So they sleep instead when the machine is already busy as torch loads.
if "OMP_WAIT_POLICY" not in os.environ and os.getloadavg()[0] >= (os.cpu_count() or 1) / 2:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
try:
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F
    import torchvision
    from torch.utils.data import DataLoader, Dataset, DistributedSampler
    from torchvision.transforms import v2
except KeyboardInterrupt:  # Ctrl-C while torch loads, before anything has started
    print(f"{os.path.basename(sys.argv[0])}: stopped by Ctrl-C while starting; nothing was written", file=sys.stderr)
    sys.exit(130)


# ---- Config ------------------------------------------------------------------------------------
ARCHS = ("resnet18", "resnet34", "resnet50", "wrn10_2", "wrn16_2", "wrn16_4", "wrn16_8", "wrn28_2",
         "mobilenetv2", "shufflenetv2")
OBJECTIVES = ("simclr", "simsiam")
# A resume keeps these (they define the networks, the data, and what a step and an epoch's position mean)...
FIXED_ON_RESUME = ("arch", "peer", "objective", "peer_objective", "dataset", "img_size", "proj_dim", "batch_size",
                   "synthetic_size")
MACHINE = ("device", "workers", "amp", "gpu_augment", "sync_bn", "compile")  # ...and resolves these anew at each start
OUTPUTS = ("checkpoint.pt", "metrics.csv", "losses.png")  # what a run writes in --out-dir
DatasetInfo = namedtuple("DatasetInfo", "img_size mean std")  # native resolution; what normalises its images
DATASETS = {"cifar10": DatasetInfo(32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
            "cifar100": DatasetInfo(32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
            "stl10": DatasetInfo(96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
            "imagefolder": DatasetInfo(64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
            "synthetic": DatasetInfo(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))}

def flag(default, help, choices=None):
    """A config field; its help and choices become those of its command-line flag."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices))

@dataclasses.dataclass
class Config:
    arch: str = flag("resnet18", "the student's architecture: the small network DoGo is for", ARCHS)
    peer: str = flag("resnet50", "the peer's architecture; none = no peer (the baseline)", ARCHS + ("none",))
    objective: str = flag("simclr", "the student's self-supervised task", OBJECTIVES)
    peer_objective: str = flag("", "the peer's task; '' = the same as --objective", OBJECTIVES + ("",))
    dataset: str = flag("cifar10", "what to train on; synthetic is built in, for offline use", tuple(DATASETS))
    data_dir: str = flag("./data", "download folder; imagefolder: class folders in train/ and test/ or val/")
    img_size: int = flag(0, "training resolution; 0 = the dataset's own (32 px; STL-10 96, imagefolder 64)")
    synthetic_size: int = flag(2000, "images in the synthetic training split (test: a quarter)")
    epochs: int = flag(200, "passes over the data (200: the usual budget of SSL studies on CIFAR)")
    max_steps: int = flag(0, "stop after this many steps in all, counted across resumes; 0 = no cap")
    batch_size: int = flag(256, "images per step (over all processes), each giving 4 views")
    lr: float = flag(3e-4, "Adam learning rate, for both networks")
    weight_decay: float = flag(1e-6, "Adam weight decay")
    temperature: float = flag(0.5, "NT-Xent temperature")
    kd_temperature: float = flag(0.1, "temperature of the similarity distributions in the KL term")
    kd_weight: float = flag(0.390625, "weight of the student's KL term (averaged over rows); 100/256: "
                            "the authors' 100 with their N*N reduction at batch 256")
    peer_kd_weight: float = flag(0.00390625, "weight of the peer's KL term; 1/256: the authors' 1 at batch 256")
    proj_dim: int = flag(128, "size of SimCLR's projection, which the losses see")
    workers: int = flag(None, "loader processes; default: this process's share of the cores, up to 8; 0 = none")
    device: str = flag("auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    seed: int = flag(0, "seed for initialisation, data order and augmentations")
    out_dir: str = flag("", "where outputs go; '' = runs/DATASET_ARCH_PEER, or the --resume checkpoint's folder")
    resume: str = flag("", "checkpoint.pt to continue, or auto: --out-dir's if it has one, else a new run; flags "
                           "given override its config, except networks, data and batch")
    log_every: int = flag(50, "steps between progress lines and rows of metrics.csv")
    knn_every: int = flag(1, "epochs between kNN top-1 figures of both networks on the test split; 0 = off")
    knn_images: int = flag(10000, "labelled training images in the kNN bank: class-stratified, the same each time")
    amp: bool = flag(None, "bfloat16 autocast for the networks, not the losses; default: on GPUs with native bfloat16")
    compile: bool = flag(False, "torch.compile the networks: a slow first step, faster later ones")
    sync_bn: bool = flag(None, "under torchrun, BatchNorm over the global batch; default: on with GPUs, which it needs")
    gpu_augment: bool = flag(True, "augment whole batches on the training device, all views in one call (faster "
                             "on GPUs and CPUs); off: per image in the loader workers")

def require(cfg, name, ok, what):
    """Refuse cfg.name unless ok(value), naming its flag and what it takes."""
    value = getattr(cfg, name)
    if not ok(value):
        raise UsageError(f"--{name.replace('_', '-')} must be {what}, got {value}")

def check_config(cfg):
    """Refuse the numbers that cannot work (argparse checks types and choices); nan and inf fail every check."""
    for name in ("lr", "temperature", "kd_temperature"):  # float32 weights: larger values overflow
        require(cfg, name, lambda v: 0 < v <= torch.finfo(torch.float32).max, "a positive float32 number")
    for name in ("weight_decay", "kd_weight", "peer_kd_weight", "img_size", "max_steps", "knn_every"):
        require(cfg, name, lambda v: 0 <= v < math.inf, "0 or more")
    for name in ("epochs", "proj_dim", "log_every", "knn_images"):
        require(cfg, name, lambda v: v >= 1, "at least 1")
    require(cfg, "batch_size", lambda v: v >= 2, "at least 2 (NT-Xent needs a negative)")
    require(cfg, "synthetic_size", lambda v: v >= 10, "at least 10")
    require(cfg, "workers", lambda v: v is None or v >= 0, "0 or more")
    return cfg


# ---- Data and augmentations --------------------------------------------------------------------
def load_dataset(name, data_dir, split, synthetic_size=2000, img_size=32):
    """The raw (image, label) dataset of a split: 'ssl' (STL-10: its unlabeled split alone), 'train' or 'test'."""
    train = split != "test"
    if name == "synthetic":  # made in memory: see the plumbing at the end of this file
        return SyntheticShapes(synthetic_size if train else max(synthetic_size // 4, 10), img_size, train=train)
    try:
        if name in ("cifar10", "cifar100"):
            return getattr(torchvision.datasets, name.upper())(data_dir, train=train, download=True)
        if name == "stl10":
            stl_split = {"ssl": "unlabeled", "train": "train", "test": "test"}[split]
            return torchvision.datasets.STL10(data_dir, split=stl_split, download=True)
        folders = [os.path.join(data_dir, f) for f in (["train"] if train else ["test", "val"])]
        if not any(map(os.path.isdir, folders)):
            raise FileNotFoundError(f"no {' or '.join(os.path.basename(f) + '/' for f in folders)} folder")
        return ImageFolder(next(filter(os.path.isdir, folders)))
    except UsageError:  # an image that cannot be read: ImageFolder names it
        raise
    except Exception as err:  # offline, missing, corrupt: all end the same way for the user
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"cannot load {name} ({split} split) from --data-dir {data_dir}: {reason}; "
                         f"put the data there, or run offline with --dataset synthetic") from None

CROP_SCALE, JITTER, P_JITTER = (0.08, 1.0), (0.8, 0.8, 0.8, 0.2), 0.8  # SimCLR's ImageNet jitter (strength 1,
P_GRAY, P_BLUR, BLUR_SIGMA = 0.2, 0.5, (0.1, 2.0)  # Chen et al. 2020, App. A; CIFAR: 0.5), the authors' at all sizes

def blur_kernel_size(img_size):
    """Odd, ~10% of the image (23 at 224 px); 0 at any other size: the authors blur at exactly 224 px only."""
    return int(0.1 * img_size) // 2 * 2 + 1 if img_size == 224 else 0

def ssl_augmentation(img_size, dataset):
    """SimCLR's augmentation of one image, ending in a normalised float tensor."""
    info, kernel = DATASETS[dataset], blur_kernel_size(img_size)
    blur = [v2.RandomApply([v2.GaussianBlur(kernel, sigma=BLUR_SIGMA)], p=P_BLUR)] if kernel else []
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(img_size, scale=CROP_SCALE, antialias=True),
                       v2.RandomHorizontalFlip(), v2.RandomApply([v2.ColorJitter(*JITTER)], p=P_JITTER),
                       v2.RandomGrayscale(p=P_GRAY), *blur, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(info.mean, info.std)])

def eval_transform(img_size, dataset):
    """No augmentation: resize and centre-crop to the training size, then normalise."""
    info = DATASETS[dataset]
    return v2.Compose([v2.ToImage(), v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(info.mean, info.std)])

class AugmentedImages(Dataset):
    """Each item: (k x C x H x W tensor, label), k independent draws of `transform` on one image."""

    def __init__(self, base, transform, k):
        self.base, self.transform, self.k = base, transform, k

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        return torch.stack([self.transform(img) for _ in range(self.k)]), label

def training_set(base, cfg):
    """The loader's items: each image's views, or with --gpu-augment the image alone, for to_views to augment.
    4 views: each network its own pair, so neither can match its peer by seeing the same pixels (Figure 1)."""
    if cfg.gpu_augment:
        sized = v2.Compose([v2.ToImage(), v2.Resize(cfg.img_size, antialias=True), v2.CenterCrop(cfg.img_size)])
        return AugmentedImages(base, sized, 1)
    return AugmentedImages(base, ssl_augmentation(cfg.img_size, cfg.dataset), 2 if cfg.peer == "none" else 4)

def to_views(batch, cfg, device):
    """A batch from the loader -> its views (B, 4 or 2, C, H, W) on the device."""
    batch = batch.to(device, non_blocking=True)  # from pinned memory: the copy overlaps compute
    if not cfg.gpu_augment:
        return batch
    info, k = DATASETS[cfg.dataset], 2 if cfg.peer == "none" else 4
    views = batch_ssl_augmentation(batch[:, 0].repeat(k, 1, 1, 1), cfg.img_size, info.mean, info.std)  # one call
    return views.unflatten(0, (k, len(batch))).transpose(0, 1)  # (k * B, C, H, W) -> (B, k, C, H, W)


# ---- Networks: encoder f (the backbone) and projection head g ----------------------------------
class WideBlock(nn.Module):
    """Pre-activation residual block of a WideResNet: BN-ReLU-conv, twice."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        a = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return y + (x if self.shortcut is None else self.shortcut(a))

def make_encoder(arch, img_size):
    """(encoder, feature size): the backbone without its classifier. Below 100 px, the CIFAR stem (stride-1 first
    convolution, no max-pool): the ImageNet stem would shrink a 32 px image to 8 px before the first block."""
    small = img_size < 100
    if arch.startswith("wrn"):  # WRN-depth_width (Zagoruyko & Komodakis 2016), a CIFAR network already
        depth, width = (int(n) for n in arch[3:].split("_"))
        blocks, c_in = [], 16
        for group, c_out in enumerate((16 * width, 32 * width, 64 * width)):  # strides 1, 2, 2
            for b in range((depth - 4) // 6):
                blocks.append(WideBlock(c_in, c_out, stride=2 if group > 0 and b == 0 else 1))
                c_in = c_out
        net = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), *blocks, nn.BatchNorm2d(c_in),
                            nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    elif arch.startswith("resnet"):
        net = getattr(torchvision.models, arch)(weights=None)
        net.fc = nn.Identity()
        if small:
            net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    elif arch == "mobilenetv2":
        net = torchvision.models.mobilenet_v2(weights=None)
        net.classifier = nn.Identity()
        if small:
            net.features[0][0].stride = (1, 1)
    elif arch == "shufflenetv2":
        net = torchvision.models.shufflenet_v2_x1_0(weights=None)
        net.fc = nn.Identity()
        if small:
            net.conv1[0].stride, net.maxpool = (1, 1), nn.Identity()
    else:
        raise UsageError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    with torch.no_grad():
        feature_dim = net.eval()(torch.zeros(1, 3, img_size, img_size)).shape[1]
    return net.train(), feature_dim

class SSLNet(nn.Module):
    """Encoder f, head g, SimSiam's predictor h: forward(x) -> (z = g(f(x)), h(z) or None); evaluation uses f."""

    def __init__(self, arch, img_size, proj_dim=128, objective="simclr", hidden_dim=512):
        super().__init__()
        self.arch, self.objective = arch, objective
        self.encoder, self.feature_dim = make_encoder(arch, img_size)
        block = lambda i, o: [nn.Linear(i, o, bias=False), nn.BatchNorm1d(o), nn.ReLU(inplace=True)]
        if objective == "simclr":  # no bias before BatchNorm: BN brings its own
            self.head = nn.Sequential(*block(self.feature_dim, hidden_dim), nn.Linear(hidden_dim, proj_dim))
            self.predictor = None
        else:  # SimSiam's (Chen & He 2021), sized down for small images: 512-d, with a 128-d bottleneck
            self.head = nn.Sequential(*block(self.feature_dim, hidden_dim), *block(hidden_dim, hidden_dim)[:2])
            self.predictor = nn.Sequential(*block(hidden_dim, hidden_dim // 4), nn.Linear(hidden_dim // 4, hidden_dim))

    def project(self, x):                 # x: (B, 3, H, W)
        return self.head(self.encoder(x))  # (B, proj_dim)

    def forward(self, x):  # one call for the whole pass, which is what DDP and compile wrap
        z = self.project(x)
        return z, (None if self.predictor is None else self.predictor(z))

def build_networks(cfg):
    """The student and its peer (None when the student trains alone), as cfg describes them."""
    student = SSLNet(cfg.arch, cfg.img_size, cfg.proj_dim, cfg.objective)
    peer = (None if cfg.peer == "none"
            else SSLNet(cfg.peer, cfg.img_size, cfg.proj_dim, cfg.peer_objective or cfg.objective))
    return student, peer

def build_optimizers(networks, cfg):
    """One Adam per network (None skipped): each is updated by its own optimiser, on its own loss."""
    return [torch.optim.Adam(n.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            for n in networks if n is not None]


# ---- Losses: pure functions of the projections of one batch ------------------------------------
def nt_xent(z1, z2, temperature=0.5):
    r"""SimCLR's NT-Xent loss (Chen et al. 2020, eq. 1), one (2N, 2N) matrix product: memory O(N^2). z1, z2:
    (N, d) projections of the two views of the same N images (row i of each from image i). Over the 2N views,
    with s the cosine similarity, t the temperature and i^+ the other view of image i (2N - 2 negatives):

    .. math::
        \ell_i = -\log \frac{\exp(s(z_i, z_{i^+}) / t)}{\sum_{k \ne i} \exp(s(z_i, z_k) / t)},
        \qquad L = \frac{1}{2N} \sum_{i=1}^{2N} \ell_i"""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)                       # (2N, d), unit rows
    logits = z @ z.T / temperature                                    # (2N, 2N)
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))  # k != i
    positive = (torch.arange(2 * n, device=z.device) + n) % (2 * n)  # i+: the other view of image i
    return F.cross_entropy(logits, positive)  # the stable log-softmax, averaged over the 2N anchors

def dogo_kl(z1, z2, z1_peer, z2_peer, temperature=0.1):
    r"""DoGo's distillation term KL(Q || P): this network's similarity distribution P is pulled towards
    its peer's, Q, a fixed target (the peer side is detached). z1, z2: (N, d) this network's projections
    of its two views; z1_peer, z2_peer: the peer's, of its own views of the same N images; t: temperature.
    A true KL divergence per row, averaged over the N rows; the authors' code divides by N*N instead
    (kl_div's reduction='mean'), so their weight is N times ours: their 100 at N = 256 is 100/256 here.

    .. math::
        P_{ij} = \operatorname{softmax}_j\big(\cos(z^1_i, z^2_j) / t\big), \quad
        Q_{ij} = \operatorname{softmax}_j\big(\cos(z^{1,peer}_i, z^{2,peer}_j) / t\big), \quad
        \mathrm{KL}(Q \| P) = \frac{1}{N} \sum_{i=1}^{N} \sum_{j=1}^{N} Q_{ij} \log \frac{Q_{ij}}{P_{ij}}"""
    def log_similarity_distribution(a, b):                            # (N, N) row log-probabilities
        # log_softmax, not softmax().log(): log P stays finite where a probability underflows
        return F.log_softmax(F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / temperature, dim=1)
    log_p = log_similarity_distribution(z1, z2)
    # Stop-gradient: the peer is a teacher for this term only; it learns from its own term.
    log_q = log_similarity_distribution(z1_peer.detach(), z2_peer.detach())
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)  # sum / N

def simsiam_loss(p1, p2, z1, z2):
    r"""SimSiam's loss (Chen & He 2021, eq. 1-2), batch-averaged; p1, p2, z1, z2: (N, d). Each prediction p
    regresses the other view's projection z, a fixed target: the stop-gradient keeps SimSiam from collapsing.

    .. math::  L = -\tfrac{1}{2}\cos(p_1, \mathrm{sg}(z_2)) - \tfrac{1}{2}\cos(p_2, \mathrm{sg}(z_1))"""
    return -(F.cosine_similarity(p1, z2.detach(), dim=1).mean()
             + F.cosine_similarity(p2, z1.detach(), dim=1).mean()) / 2


# ---- The training step -------------------------------------------------------------------------
class NonFiniteLoss(Exception):
    """A loss or the weights became NaN or infinite: the run stops without saving them."""

def ssl_loss(net, x1, x2, temperature, amp=False):
    """One network on its two views -> (SSL loss, its (N, d) outputs: SimCLR's projections (z1, z2), SimSiam's
    predictions and projections (p1, p2, z1, z2); [:2] its own similarities, [-2:] its projections). amp: bf16."""
    x = torch.cat([x1, x2])
    if x.is_cuda:  # the networks are stored channels-last on GPUs, the faster layout for cuDNN
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        z, p = net(x)
    # The losses stay in float32: softmax over 2N logits at t = 0.1 needs more than bf16's 8 bits. Under
    # torchrun, gather makes every loss that of the global batch: every anchor meets all 2N - 2 negatives.
    z1, z2 = (gather(t) for t in z.float().chunk(2))                    # (N, d) each
    if p is None:
        return nt_xent(z1, z2, temperature), (z1, z2)
    p1, p2 = (gather(t) for t in p.float().chunk(2))
    return simsiam_loss(p1, p2, z1, z2), (p1, p2, z1, z2)

def train_step(student, peer, optimizers, views, cfg):
    """One DoGo step on views (B, 4 or 2, C, H, W): 0-1 the student's, 2-3 the peer's -> its loss terms as device
    tensors: reading a value would make the host wait for the device, so the loop reads them once an interval."""
    amp = views.is_cuda if cfg.amp is None else cfg.amp
    ssl, s = ssl_loss(student, views[:, 0], views[:, 1], cfg.temperature, amp)
    terms, loss = {"ssl": ssl}, ssl
    if peer is not None:  # KL targets as the authors': the peer's [:2]; for a SimSiam network, the peer's [-2:]
        ssl_peer, q = ssl_loss(peer, views[:, 2], views[:, 3], cfg.temperature, amp)
        terms["kl"] = dogo_kl(*s[:2], *(q[-2:] if len(s) == 4 else q[:2]), cfg.kd_temperature)  # student
        terms["ssl_peer"] = ssl_peer
        terms["kl_peer"] = dogo_kl(*q[:2], *(s[-2:] if len(q) == 4 else s[:2]), cfg.kd_temperature)  # peer
        loss = loss + cfg.kd_weight * terms["kl"] + ssl_peer + cfg.peer_kd_weight * terms["kl_peer"]
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()  # dogo_kl detaches its target: each network gets exactly the gradient of its own loss
    for opt in optimizers:
        opt.step()
    return {k: v.detach() for k, v in terms.items()}


# ---- The training loop and its checkpoints -----------------------------------------------------
def networks_on(device, cfg):
    """[student, peer or None] on the device, from cfg.seed: the same initial weights in every process."""
    torch.manual_seed(cfg.seed)
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return [net and net.to(device, memory_format=layout) for net in build_networks(cfg)]

def runner(net, cfg, device, world):
    """net as train_step calls it (None stays None): in DDP under torchrun; compiled in place with --compile."""
    if net is not None and world > 1:
        if cfg.sync_bn:  # BatchNorm over the global batch, in place: the optimiser keeps the same parameters
            nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    if net is not None and cfg.compile:
        net.compile()
    return net

def train(cfg, ckpt=None, rank=0, world=1, device=torch.device("cpu")):
    """Train from scratch or ckpt (see resolve_config) -> (student, peer); only process 0 prints and writes."""
    data = training_set(load_dataset(cfg.dataset, cfg.data_dir, "ssl", cfg.synthetic_size, cfg.img_size), cfg)
    steps_per_epoch = len(data) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {cfg.batch_size} exceeds the {len(data)} training images; use a smaller one"
                         if data else f"the {cfg.dataset} training split in --data-dir {cfg.data_dir} has no images")
    student, peer = networks_on(device, cfg)
    optimizers = build_optimizers([student, peer], cfg)
    step = restore(ckpt, student, peer, optimizers, cfg, device) if ckpt else 0
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)
    run_student, run_peer = (runner(net, cfg, device, world) for net in (student, peer))
    if rank:  # other augmentations in each process (the weights stay in step through DDP)
        torch.manual_seed(seed_of(cfg, rank, step))
    loader = make_loader(data, cfg, device, rank, world, step)
    say = print if rank == 0 else lambda *args, **kwargs: None
    ckpt_path, csv_path, png_path = (os.path.join(cfg.out_dir, name) for name in OUTPUTS)
    say(f"DoGo: {describe(cfg)} on {cfg.dataset} ({len(data)} images, {cfg.img_size} px), batch {cfg.batch_size}, "
        f"{steps_per_epoch} steps/epoch, steps {step} -> {total_steps}, "
        f"{f'{world} processes on {device.type}' if world > 1 else f'device {device}'}, out-dir {cfg.out_dir}",
        flush=True)
    if step >= total_steps:
        say(f"nothing to do: the checkpoint is at step {step}; raise --epochs or --max-steps")
        return student, peer
    with claim_out_dir(cfg.out_dir, cfg.resume) if rank == 0 else contextlib.nullcontext(), \
            StopOnSignal(quiet=rank > 0) as signals:
        monitor = KnnMonitor.of(cfg, device) if rank == 0 else None  # the others wait meanwhile
        log, start, stop = Progress(csv_path, cfg, step, total_steps, steps_per_epoch, device, rank), step, False
        while step < total_steps and not stop:
            loader.sampler.start(step // steps_per_epoch, skip=step % steps_per_epoch * cfg.batch_size // world)
            for batch, _ in log.timed(loader):
                views = to_views(batch, cfg, device)
                log.interval.append(train_step(run_student, run_peer, optimizers, views, cfg))
                step += 1
                # An interval ends at every --log-every steps, at this start's first step (its time holds the
                # warm-up), at each save and on a stop request: a single process stops after this step, several
                # processes agree at the interval, where they already wait for each other.
                if (step % cfg.log_every == 0 or step % steps_per_epoch == 0 or step in (start + 1, total_steps)
                        or (world == 1 and signals.requested)):
                    stop = log.write(step, signals.requested)  # the interval's one read of device values
                if stop or step % steps_per_epoch == 0 or step == total_steps:
                    break
            if rank == 0:  # the end of an epoch or of the run, or a stop request
                with log.paused():  # saves and the kNN monitor count in neither the speed nor the data wait
                    if monitor and not stop and (step == total_steps or step % (cfg.knn_every * steps_per_epoch) == 0):
                        log.record(monitor([student, peer]))
                    check_outputs([student, peer], views, cfg, step)
                    save_checkpoint(ckpt_path, cfg, step, student, peer, optimizers)
                    plot_losses(log.rows, png_path, cfg)
    if stop:
        say(f"stopped by {signals.name} at step {step}: saved {ckpt_path}; continue with python dogo.py --resume "
            f"{ckpt_path}")
        sys.exit(128 + signals.signum)
    speed = f"{log.steady_speed():.1f} img/s after the first step" if log.steady_speed() else "too short for a speed"
    say(f"done: {ckpt_path}, {csv_path}, {png_path}; {speed}")
    return student, peer

def likely_cause(cfg):
    """What to change after a non-finite loss or weights: a temperature near 0, else the learning rate."""
    low = [name for name in ("temperature", "kd_temperature") if getattr(cfg, name) < 0.01]
    return f"raise --{low[0].replace('_', '-')}" if low else f"try a lower --lr than {cfg.lr}"

@torch.no_grad()
def check_outputs(networks, views, cfg, step):
    """Refuse to save weights that give views (B, k, C, H, W) non-finite projections: finite ones can (1e30)."""
    for net in filter(None, networks):
        finite = bool(torch.isfinite(net.eval()(views[:, 0])[0]).all())
        net.train()
        if not finite:
            raise NonFiniteLoss(f"the weights after step {step} give non-finite projections; stopped without "
                                f"saving them; {likely_cause(cfg)}{kept_checkpoint(cfg)}")

def main(argv=None):
    """The command line. Errors the user can fix: one line, exit 2; a stop by a signal: exit 128 + its number."""
    cfg, previous = None, {s: signal.signal(s, stop_at_once) for s in STOP_SIGNALS[1:]}  # outside the loop:
    try:                                                                                  # stop at once
        cfg, given = parse_flags(Config, argv, "dogo.py", __doc__.splitlines()[0])
        cfg, ckpt = resolve_config(cfg, given)
        rank, world, device = init_distributed(cfg)
        cfg = resolve_machine(cfg, device, world)
        torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed sizes: cuDNN picks its kernels once
        train(cfg, ckpt, rank, world, device)
    except (UsageError, NonFiniteLoss, OSError) as err:  # OSError: a file that failed mid-run (an image, the disk)
        if int(os.environ.get("RANK", 0) or 0):  # torchrun stops all processes when the first one
            time.sleep(5)                         # ends: let process 0 say it, once, when all agree
        kept = kept_checkpoint(cfg) if isinstance(err, OSError) else ""
        print(f"dogo.py: error: {last_line(err)}{kept}", file=sys.stderr)
        sys.exit(1 if isinstance(err, NonFiniteLoss) else 2)
    except KeyboardInterrupt as err:  # a second stop request in the loop, or one outside it
        signum = err.args[0] if err.args else signal.SIGINT  # Python's own Ctrl-C has no number
        print(f"dogo.py: stopped by {signal.Signals(signum).name} without saving{kept_checkpoint(cfg)}",
              file=sys.stderr)
        sys.exit(128 + signum)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for s, handler in previous.items():
            signal.signal(s, handler)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would take the kill below for a crash
        for worker in multiprocessing.active_children():  # loader workers ignore the stop signals, and so
            worker.kill()                                  # torch's own SIGTERM at exit: an error would hang


# ==== Plumbing: how the script runs, not what it computes =======================================
# ---- Flags: a config dataclass becomes the command line ----------------------------------------
class UsageError(Exception):
    """A problem the user can fix (a flag, a path, missing data): reported as one line, exit 2."""

def parse_flags(config_class, argv=None, prog="dogo.py", description=None):
    """(config, names of the flags given): a flag per field of config_class, with its help and choices."""
    class FlagParser(argparse.ArgumentParser):
        def error(self, message):  # one line naming the problem, instead of the usage and exit
            raise UsageError(f"{message} (see python {self.prog} --help)")

    # SUPPRESS: flags not given stay out of the namespace, so that --resume can tell them apart.
    parser = FlagParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(config_class):
        choices = f.metadata["choices"]
        default = "" if f.default is None else f" (default: {f.default!r})"  # None: told in the help
        metavar = "{" + ",".join(c or "''" for c in choices) + "}" if choices else f.type.__name__.upper()
        kind = dict(type=f.type, choices=choices, metavar=metavar)
        if f.type is bool:  # --amp and --no-amp
            kind = dict(action=argparse.BooleanOptionalAction)
        parser.add_argument("--" + f.name.replace("_", "-"), help=f.metadata["help"] + default, **kind)
    given = vars(parser.parse_args(argv))
    return config_class(**given), set(given)


# ---- Checkpoints: written whole or not at all, checked completely before anything uses them -----
@contextlib.contextmanager
def atomic_file(path):
    """A binary file that replaces `path` once whole; a failed write (torch reports a full disk as RuntimeError)
    keeps the previous file, leaves no temporary one and ends in one line."""
    try:
        with open(path + ".tmp", "wb") as f:
            yield f
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as err:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        reason = getattr(err, "strerror", None) or "the write failed: is the disk full?"  # torch's says less
        raise UsageError(f"cannot save {path} ({reason}); the previous one is left as it was: free some space, "
                         f"or give another folder") from None

def ran_on(device):
    """What a checkpoint or a result line records of the machine."""
    return dict(torch=str(torch.__version__), torchvision=torchvision.__version__,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")

def save_checkpoint(path, cfg, step, student, peer, optimizers):
    """Only tensors and plain values, so that it loads with weights_only=True; the config is the one that ran."""
    state = dict(config=dataclasses.asdict(cfg), step=step, ran_on=ran_on(torch.device(cfg.device)),
                 student=student.state_dict(), student_opt=optimizers[0].state_dict(),
                 peer=peer.state_dict() if peer else None, peer_opt=optimizers[1].state_dict() if peer else None,
                 rng_cpu=torch.get_rng_state(),  # the augmentations draw from it
                 rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    with atomic_file(path) as f:
        torch.save(state, f)

def load_checkpoint(path, flag="--resume", resume=True):
    """(checkpoint, its Config, SHA-256 of the bytes read), read once without running any code it may hold and checked
    for all its caller needs: config types and values, every weight's shape; to resume, optimiser and RNG states."""
    def refuse(problem):
        return UsageError(f"{flag} {path}: {problem}; give a checkpoint.pt that dogo.py wrote")
    try:
        with open(path, "rb") as f:
            data = f.read()
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except OSError as err:
        raise refuse(f"cannot be read ({err.strerror or err})") from None
    except Exception as err:  # not a checkpoint, or one that would run code
        raise refuse(f"not a checkpoint ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise refuse("not a dogo.py checkpoint (it has no config)")
    if type(ckpt.get("step")) is not int or ckpt["step"] < 0:
        raise refuse(f"its step is {ckpt.get('step')!r}, not a number of steps")
    cfg = config_from_checkpoint(ckpt["config"], refuse)
    with torch.device("meta"):  # shapes without memory or time
        networks = dict(zip(("student", "peer"), build_networks(cfg)))
    for name, net in networks.items():
        if (net is None) != (ckpt.get(name) is None):
            raise refuse(f"its {name} weights are {'missing' if net else 'there'}, its config says --peer {cfg.peer}")
        if net is not None:
            check_shapes(ckpt[name], net.state_dict(), f"its {name} weights do not fit a {net.arch}", refuse)
        if net is not None and resume:  # Adam's two moments of each parameter, in one group
            opt, params = ckpt.get(name + "_opt"), list(net.parameters())
            groups = opt.get("param_groups") if isinstance(opt, dict) else None
            if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict) and
                    groups[0].get("params") == list(range(len(params))) and isinstance(opt.get("state"), dict)):
                raise refuse(f"its {name} optimiser state is missing or not that of its parameters")
            moments = {f"{i} {k}": v for i, s in opt["state"].items() if isinstance(s, dict) for k, v in s.items()}
            check_shapes({k: v for k, v in moments.items() if not k.endswith(" step")}, {f"{i} {k}": p for i, p in
                         enumerate(params) for k in ("exp_avg", "exp_avg_sq")}, f"its {name} optimiser state does "
                         f"not fit", refuse)
    if resume and not isinstance(ckpt.get("rng_cpu"), torch.Tensor):
        raise refuse("it has no random number generator state to resume with")
    return ckpt, cfg, hashlib.sha256(data).hexdigest()

def check_shapes(saved, expected, what, refuse):
    """Refuse unless saved ({name: tensor}) has exactly expected's names and shapes."""
    if not isinstance(saved, dict) or saved.keys() != expected.keys():
        raise refuse(f"{what} (other tensors)")
    for key, tensor in expected.items():
        if not isinstance(saved[key], torch.Tensor) or saved[key].shape != tensor.shape:
            got = tuple(saved[key].shape) if isinstance(saved[key], torch.Tensor) else type(saved[key]).__name__
            raise refuse(f"{what}: {key} is {got}, not {tuple(tensor.shape)}")

def config_from_checkpoint(config, refuse):
    """A checkpoint's Config, values checked; fields unknown here are dropped (--benchmark), missing ones default."""
    fields, values = {f.name: f for f in dataclasses.fields(Config)}, {}
    for name, value in ((k, v) for k, v in config.items() if k in fields):
        f = fields[name]  # an int is a float too, a bool no int
        fits = isinstance(value, (int, float) if f.type is float else f.type) and (
            f.type is bool or not isinstance(value, bool))
        if not (fits or value is None is f.default) or value not in (f.metadata["choices"] or (value,)):
            raise refuse(f"its config has {name} = {value!r}")
        values[name] = value
    try:
        return check_config(Config(**values))
    except UsageError as err:
        raise refuse(f"its config: {err}") from None

def resolve_config(cfg, given=frozenset()):
    """(config to run, checkpoint to resume or None). With --resume, `given` flags override the checkpoint's config,
    except FIXED_ON_RESUME, which must agree; MACHINE never comes from it; the out-dir is its folder by default."""
    cfg = dataclasses.replace(check_config(cfg), img_size=cfg.img_size or DATASETS[cfg.dataset].img_size)
    cfg.out_dir = cfg.out_dir or os.path.join("runs", f"{cfg.dataset}_{cfg.arch}_{cfg.peer}")
    auto = os.path.join(cfg.out_dir, OUTPUTS[0])
    if cfg.resume == "auto":  # the same command starts a run, then continues it each time a job is requeued
        cfg.resume = auto if os.path.exists(auto) else ""
    if not cfg.resume:
        return cfg, None
    ckpt, saved, _ = load_checkpoint(cfg.resume)
    for name in filter(lambda name: name in given and getattr(cfg, name) != getattr(saved, name), FIXED_ON_RESUME):
        raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)} differs from the checkpoint's "
                         f"{getattr(saved, name)}; drop the flag to resume, or start a new run without --resume")
    cfg = dataclasses.replace(saved, **{k: getattr(cfg, k) for k in {*given, *MACHINE, "resume", "out_dir"}
                                        if k not in FIXED_ON_RESUME})
    cfg.out_dir = cfg.out_dir if "out_dir" in given else os.path.dirname(os.path.abspath(cfg.resume))
    return cfg, ckpt

def restore(ckpt, student, peer, optimizers, cfg, device):
    """Load the networks, their optimisers (with this run's --lr and --weight-decay) and the RNG state -> step."""
    for net, opt, name in zip((student, peer), optimizers, ("student", "peer")):
        net.load_state_dict(ckpt[name])
        opt.load_state_dict(ckpt[name + "_opt"])
        for group in opt.param_groups:  # the flags given now, so that the config saved is what ran
            group.update(lr=cfg.lr, weight_decay=cfg.weight_decay)
    torch.set_rng_state(ckpt["rng_cpu"])
    if device.type == "cuda" and ckpt.get("rng_cuda"):
        torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
    return ckpt["step"]


# ---- Devices and processes (torchrun) ----------------------------------------------------------
def pick_device(name):
    """'auto' means CUDA when there is a GPU, else CPU."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    return device

def init_distributed(cfg):
    """(rank, world size, device) from torchrun's RANK, LOCAL_RANK and WORLD_SIZE: NCCL on GPUs, else gloo."""
    device = pick_device(cfg.device)
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing or not os.environ["WORLD_SIZE"].isdigit():
        raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set, but not {missing[0] if missing else 'a count'}"
                         f" as torchrun sets it; start the processes with torchrun, or unset WORLD_SIZE")
    world = int(os.environ["WORLD_SIZE"])
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} does not split evenly over {world} processes; "
                         f"give a multiple of {world} (it is the global batch, over all processes)")
    if cfg.sync_bn and device.type != "cuda":
        raise UsageError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on CPU; drop the flag")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device

def resolve_machine(cfg, device, world):
    """cfg with MACHINE resolved for this start and machine (a GPU run resumes on a laptop), as it will be saved."""
    cuda, share = device.type == "cuda", (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    default = dict(workers=min(8, max(share, 1)), sync_bn=cuda and world > 1,
                   # bfloat16 only where the GPU computes it natively (a T4 emulates it, slower than float32)
                   amp=cuda and torch.cuda.is_bf16_supported(including_emulation=False))
    return dataclasses.replace(cfg, device=str(device),
                               **{k: v if getattr(cfg, k) is None else getattr(cfg, k) for k, v in default.items()})

class GatherRows(torch.autograd.Function):
    """all_gather (torch's differentiable one is deprecated) whose backward sums over the processes the gradients
    of this process's rows: all compute the same loss, so DDP's average of that W-fold sum is the whole batch's."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # autograd may share or reuse the incoming
        dist.all_reduce(grad)                                     # gradient elsewhere: reduce a copy, in place
        return grad.chunk(dist.get_world_size())[dist.get_rank()]

def gather(x):
    """(n, ...) on each of W processes -> (W * n, ...), in rank order; x itself without torchrun."""
    return GatherRows.apply(x) if dist.is_initialized() else x

class EpochOrder(DistributedSampler):
    """This process's share of each epoch's order, fixed by (seed, epoch): process r of W takes positions r,
    r + W, ..., so global batches do not depend on W. start(epoch, skip) skips what a resumed run has seen."""

    def __init__(self, data, seed, rank=0, world=1):
        super().__init__(data, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def start(self, epoch, skip=0):
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return super().__len__() - self.skip

def seed_of(cfg, rank, step):
    """A seed of its own for each process and each start of a run (a resumed run draws anew)."""
    return int(np.random.SeedSequence([cfg.seed, rank, step]).generate_state(1)[0])

def make_loader(data, cfg, device, rank=0, world=1, step=0):
    """This process's batches; call loader.sampler.start(epoch, skip) before each epoch; step: the run's start."""
    return DataLoader(data, cfg.batch_size // world, sampler=EpochOrder(data, cfg.seed * 100003, rank, world),
                      drop_last=True,  # every step has the same number of negatives
                      num_workers=cfg.workers, persistent_workers=cfg.workers > 0,  # no start-up per epoch
                      pin_memory=device.type == "cuda",  # page-locked: copies to the GPU overlap compute
                      generator=torch.Generator().manual_seed(seed_of(cfg, rank, step)),
                      worker_init_fn=ignore_stop_signals)


# ---- Stop requests: Ctrl-C, a scheduler's SIGTERM, a closed terminal's SIGHUP ---------------------
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

def ignore_stop_signals(worker_id):
    for s in STOP_SIGNALS:  # loader workers: the main process handles them
        signal.signal(s, signal.SIG_IGN)

def stop_at_once(signum, _):  # a stop request that cannot wait for the end of a step
    raise KeyboardInterrupt(signum)

class StopOnSignal:
    """A first stop request is noted, for the loop to save and stop; a second one aborts. quiet: for ranks > 0."""
    signum = 0
    requested = property(lambda self: self.signum != 0)
    name = property(lambda self: signal.Signals(self.signum or signal.SIGINT).name)

    def __init__(self, quiet=False):
        self.quiet = quiet

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def _handle(self, signum, _):
        self.signum = signum
        if not self.quiet:
            print(f"\n{self.name}: saving at the next stop point (another one aborts without saving)", flush=True)
        for s in STOP_SIGNALS:
            signal.signal(s, stop_at_once)

    def __exit__(self, *_):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

def kept_checkpoint(cfg):
    """What a run that ends in an error leaves: its out-dir's checkpoint, if there is one."""
    path = cfg and cfg.out_dir and os.path.join(cfg.out_dir, OUTPUTS[0])
    return f"; {path} is kept as it was" if path and os.path.isfile(path) else "; no checkpoint was saved"

def last_line(err):
    """The line of an error to show: a loader worker's error arrives as its whole traceback, ending in its own."""
    line = (str(err).strip() or type(err).__name__).splitlines()[-1]
    return line.split(": ", 1)[-1] if str(err).startswith("Caught ") else line


# ---- The output folder -------------------------------------------------------------------------
@contextlib.contextmanager
def claim_out_dir(path, resume=""):
    """Make --out-dir, check that it takes every output, hold it with a lock file (a stale one is replaced): another
    run there ends in one line. An earlier run's checkpoint there is replaced only by the run that resumes it."""
    try:
        os.makedirs(path, exist_ok=True)
        for name in OUTPUTS:  # the very names that saves write: a path too long fails now, not after an epoch
            open(os.path.join(path, name + ".tmp"), "w").close()
            os.remove(os.path.join(path, name + ".tmp"))
    except OSError as err:
        raise UsageError(f"--out-dir {path}: cannot write there ({err.strerror or err}); give another") from None
    for name in filter(lambda name: os.path.isdir(os.path.join(path, name)), OUTPUTS):
        raise UsageError(f"--out-dir {path}: {name} there is a folder; move it away or give another --out-dir")
    lock = os.path.join(path, "run.lock")
    while True:
        try:
            with open(lock, "x") as f:  # "x" fails if the file exists: of two runs starting, one claims it
                f.write(str(os.getpid()))
            break
        except FileExistsError:
            with open(lock) as f:
                owner = f.read().strip()
        try:  # signal 0 sends nothing: it asks whether the owner still runs (PermissionError: another user's)
            os.kill(int(owner), 0)
        except (ValueError, ProcessLookupError):  # no process id, or its run ended without removing the lock
            os.remove(lock)
            continue
        except PermissionError:
            pass
        raise UsageError(f"--out-dir {path} is in use by another run (process {owner}, see {lock}); "
                         f"wait for it to end, or give another --out-dir")
    try:
        ckpt = os.path.join(path, OUTPUTS[0])
        if os.path.exists(ckpt) and not (resume and os.path.samefile(resume, ckpt)):
            raise UsageError(f"--out-dir {path} holds an earlier run's checkpoint; continue it with --resume {ckpt} "
                             f"(or --resume auto), or give another --out-dir")
        yield
    finally:
        with contextlib.suppress(OSError):  # a folder gone or read-only now: the error that says so matters more
            os.remove(lock)


# ---- Progress: the losses, the speed and what bounds it, the kNN figures; metrics.csv and its plot
class Progress:
    """The --log-every intervals: the loss terms stay on the device until an interval ends, then a line and a row of
    metrics.csv give their means, images_per_s and data_wait (the share of the time spent waiting for batches)."""

    def __init__(self, csv_path, cfg, step, total_steps, steps_per_epoch, device, rank=0):
        self.csv_path, self.cfg, self.steps, self.device, self.rank = csv_path, cfg, (step, total_steps), device, rank
        self.steps_per_epoch, self.rows = steps_per_epoch, read_metrics(csv_path, step) if step and rank == 0 else []
        self.interval, self.waited, self.elapsed, self.tick = [], 0.0, 0.0, time.perf_counter()
        self.steady = [0, 0.0]  # images and seconds after this start's first interval, which holds the warm-up

    def timed(self, batches):  # the batches, each one's wait added to the interval's
        batches, tick = iter(batches), time.perf_counter()
        for batch in batches:
            self.waited += time.perf_counter() - tick
            yield batch
            tick = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):  # what runs in the block (saves, the kNN monitor) counts in no figure
        self.elapsed += time.perf_counter() - self.tick
        yield
        self.tick = time.perf_counter()

    def write(self, step, stop=False):
        """End the interval at `step` -> whether to stop now (a stop request in any process: all stop together)."""
        requested = torch.tensor([float(stop)], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(requested, op=dist.ReduceOp.MAX)
        sums = torch.stack([torch.stack(list(terms.values())) for terms in self.interval]).sum(0)
        *sums, stop = torch.cat([sums.float(), requested]).tolist()  # the interval's one read of device values
        n, first = len(self.interval), step - len(self.interval) + 1
        means = {k: s / n for k, s in zip(self.interval[0], sums)}
        if not all(map(math.isfinite, means.values())):
            values = ", ".join(f"{k} {v:.4g}" for k, v in means.items())
            raise NonFiniteLoss(f"a loss is not finite in steps {first}-{step} ({values}); stopped, dropping the "
                                f"weights since the last save; {likely_cause(self.cfg)}{kept_checkpoint(self.cfg)}")
        self.elapsed += time.perf_counter() - self.tick
        speed = n * self.cfg.batch_size / self.elapsed
        if first > self.steps[0] + 1:
            self.steady = [self.steady[0] + n * self.cfg.batch_size, self.steady[1] + self.elapsed]
        row = {"epoch": (step - 1) // self.steps_per_epoch + 1, "step": step, **means, "images_per_s": speed,
               "data_wait": self.waited / self.elapsed}
        if self.device.type == "cuda":
            row["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        if self.rank == 0:
            self.rows.append(row)
            self.save()
            eta = (self.steps[1] - step) * self.cfg.batch_size / (self.steady_speed() or speed)
            memory = f", {row['gpu_mem_gb']:.1f} GB on the GPU" if "gpu_mem_gb" in row else ""
            print(f"epoch {row['epoch']}/{self.cfg.epochs} step {step}/{self.steps[1]} | "
                  + " ".join(f"{k} {v:.4f}" for k, v in means.items()) + f" | {speed:.1f} img/s, data wait "
                  f"{row['data_wait']:.2f}{memory} | eta {eta // 3600:.0f}h{eta % 3600 // 60:02.0f}m", flush=True)
        self.interval, self.waited, self.elapsed, self.tick = [], 0.0, 0.0, time.perf_counter()
        return bool(stop)

    def record(self, figures):
        """The kNN monitor's figures ({column: percent}), on the last row: that of the interval ending an epoch."""
        self.rows[-1].update(figures)
        self.save()
        print(f"kNN top-1 at step {self.rows[-1]['step']}: " + ", ".join(
            f"{'peer' if k.endswith('peer') else 'student'} {v:.2f}%" for k, v in figures.items()), flush=True)

    def save(self):
        """metrics.csv: one header, the union of the rows' columns (a resume may add some), missing values empty."""
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for row in self.rows for k in row)), restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        with atomic_file(self.csv_path) as f:
            f.write(text.getvalue().encode())

    def steady_speed(self):
        """Images/s of this start after its first interval, whose time holds the warm-up (0: too short to say)."""
        return self.steady[0] / self.steady[1] if self.steady[1] else 0.0

def read_metrics(path, step):
    """metrics.csv's rows up to `step` (not those a crash lost); an edited file is refused, never rewritten."""
    if not os.path.exists(path):
        return []
    try:
        with open(path, newline="") as f:
            return [row for row in csv.DictReader(f) if int(row["step"]) <= step]
    except (OSError, KeyError, TypeError, ValueError, csv.Error) as err:
        raise UsageError(f"{path} cannot be read as dogo.py wrote it ({type(err).__name__}: {err}); restore it, "
                         f"or move it away to resume with its curves started anew") from None

LOSS_NAMES = {"simclr": "NT-Xent", "simsiam": "SimSiam loss"}

def describe(cfg):
    """The networks and their losses, e.g. 'resnet18 (NT-Xent) + peer resnet50 (NT-Xent)'."""
    peer = f"peer {cfg.peer} ({LOSS_NAMES[cfg.peer_objective or cfg.objective]})" if cfg.peer != "none" else "no peer"
    return f"{cfg.arch} ({LOSS_NAMES[cfg.objective]}) + {peer}"

def plot_losses(rows, png_path, cfg):
    """losses.png from the rows of metrics.csv: the SSL terms; the KL terms with a peer; the kNN figures, if any."""
    from matplotlib.figure import Figure  # no pyplot: works headless and leaves notebooks alone
    series = lambda key: [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    panels = [(title, keys) for title, keys in (("SSL loss", ("ssl", "ssl_peer")), ("KL to the peer", ("kl",
              "kl_peer")), ("kNN top-1 (%)", ("knn", "knn_peer"))) if series(keys[0])]
    fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    for ax, (title, keys) in zip(fig.subplots(1, len(panels), squeeze=False)[0] if panels else [], panels):
        for key, who, objective in zip(keys, ("student", "peer"), (cfg.objective, cfg.peer_objective or cfg.objective)):
            label = f"{who} ({LOSS_NAMES[objective]})" if key.startswith("ssl") else who
            if series(key):
                ax.plot(*zip(*series(key)), label=label, marker="o" if len(series(key)) < 30 else None)
        ax.set(title=title, xlabel="step", ylabel="top-1 (%)" if key.startswith("knn") else "loss")
        ax.legend()
    if panels:
        with atomic_file(png_path) as f:
            fig.savefig(f, format="png")


# ---- The kNN monitor: the representation's quality while it trains -------------------------------
def dataset_labels(base):
    """All labels of a dataset as an int64 array, without decoding an image where it can."""
    for name in ("targets", "labels"):  # CIFAR, ImageFolder and synthetic; STL-10
        if hasattr(base, name):
            return np.asarray(getattr(base, name), dtype=np.int64)
    return np.array([label for _, label in base], dtype=np.int64)

@torch.no_grad()
def knn_scores(train_features, train_labels, test_features, num_classes, k=200, temperature=0.1):
    r"""Weighted kNN class scores (Wu et al. 2018) (N_test, num_classes); N_k(x): the k most cosine-similar features.

    .. math::  \mathrm{score}_c(x) = \sum_{i \in \mathcal{N}_k(x)} [y_i = c] \, \exp(\cos(x, x_i) / t)"""
    train = F.normalize(train_features, dim=1)                          # (N_train, D)
    labels = torch.as_tensor(np.asarray(train_labels, dtype=np.int64), device=train.device)
    scores = []
    for test in F.normalize(test_features, dim=1).split(256):          # (B, D): memory B * N_train
        similarity, neighbours = (test @ train.T).topk(min(k, len(labels)), dim=1)  # (B, k)
        votes = torch.zeros(len(test), num_classes, device=test.device)
        scores.append(votes.scatter_add_(1, labels[neighbours], (similarity / temperature).exp()))
    return torch.cat(scores)

def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes, k=200, temperature=0.1):
    """Top-1 accuracy (percent) of the weighted kNN classifier of knn_scores."""
    scores = knn_scores(train_features, train_labels, test_features, num_classes, k, temperature)
    labels = torch.as_tensor(np.asarray(test_labels, dtype=np.int64), device=scores.device)
    return 100.0 * (scores.argmax(dim=1) == labels).sum().item() / len(labels)

class KnnMonitor:
    """kNN top-1 of each encoder (eval mode, float32): up to --knn-images labelled training images, class-stratified,
    against the test split, decoded once. It draws no random number and changes no BatchNorm statistic."""

    def __init__(self, cfg, device):
        splits = [load_dataset(cfg.dataset, cfg.data_dir, split, cfg.synthetic_size, cfg.img_size)
                  for split in ("train", "test")]
        self.labels = [dataset_labels(split) for split in splits]
        rng, labels = np.random.default_rng(0), self.labels[0]  # NumPy's own generator, seeded
        bank = np.arange(len(labels)) if cfg.knn_images >= len(labels) else np.sort(np.concatenate(
            [rng.permutation(np.flatnonzero(labels == c))[:max(1, round(cfg.knn_images * np.mean(labels == c)))]
             for c in np.unique(labels)]))
        sized = v2.Compose([v2.ToImage(), v2.Resize(cfg.img_size, antialias=True), v2.CenterCrop(cfg.img_size)])
        self.images = [torch.stack([sized(split[int(i)][0]) for i in chosen]).to(device)  # uint8 (N, 3, S, S)
                       for split, chosen in zip(splits, (bank, range(len(splits[1]))))]
        self.labels[0], self.info = labels[bank], DATASETS[cfg.dataset]
        self.num_classes = len(getattr(splits[0], "classes", ())) or int(labels.max()) + 1
        print(f"kNN monitor: {len(bank)} training images against {len(splits[1])} test images", flush=True)

    @classmethod
    def of(cls, cfg, device):
        """The monitor, or None: off (--knn-every 0), or an image folder without a test split, said in one line."""
        if cfg.dataset == "imagefolder" and cfg.knn_every and not any(
                os.path.isdir(os.path.join(cfg.data_dir, f)) for f in ("test", "val")):
            print(f"note: --data-dir {cfg.data_dir} has no test/ or val/ folder: this run has no kNN monitor")
        elif cfg.knn_every:
            return cls(cfg, device)

    @torch.no_grad()
    def features(self, encoder, images):  # uint8 (N, 3, S, S) -> (N, D), normalised as eval_transform does
        x = (v2.functional.normalize(batch.float() / 255, self.info.mean, self.info.std) for batch in images.split(256))
        return torch.cat([encoder(b.contiguous(memory_format=torch.channels_last) if b.is_cuda else b) for b in x])

    def __call__(self, networks):
        """{'knn': the student's top-1 in percent, 'knn_peer': the peer's}."""
        figures = {}
        for name, net in zip(("knn", "knn_peer"), networks):
            if net is not None:
                was_training = net.training
                net.eval()  # BatchNorm normalises with its running statistics, and leaves them as they are
                bank, test = (self.features(net.encoder, images) for images in self.images)
                net.train(was_training)
                figures[name] = knn_accuracy(bank, self.labels[0], test, self.labels[1], self.num_classes)
        return figures


# ---- The synthetic dataset, for offline runs and tests -----------------------------------------
class SyntheticShapes(Dataset):
    """Ten classes, five shapes and five textures, drawn in memory, the same each time: (uint8 3xSxS, label)."""
    classes = ("disk", "square", "triangle", "ring", "cross", "hstripes", "vstripes", "diagonal", "checker", "dots")

    def __init__(self, size=2000, img_size=32, train=True):
        rng = np.random.default_rng(0 if train else 1)  # disjoint train and test images
        self.targets = [i % len(self.classes) for i in range(size)]
        self.images = torch.from_numpy(np.stack([self._draw(c, img_size, rng) for c in self.targets]))

    @staticmethod
    def _draw(label, s, rng):
        y, x = np.mgrid[0:s, 0:s] / s                    # pixel centres in [0, 1)
        cx, cy = rng.uniform(0.3, 0.7, size=2)
        r = rng.uniform(0.15, 0.35)                      # shape radius, as a fraction of the image
        period = rng.uniform(0.12, 0.3)                  # texture period, likewise
        phase = rng.uniform(0, 1)
        dx, dy = x - cx, y - cy
        masks = [dx ** 2 + dy ** 2 < r ** 2,                                          # disk
                 np.maximum(abs(dx), abs(dy)) < r * 0.8,                              # square
                 (dy < r * 0.7) & (dy > 2 * abs(dx) - r),                             # triangle
                 abs(np.sqrt(dx ** 2 + dy ** 2) - r * 0.8) < r * 0.25,                # ring
                 (np.minimum(abs(dx), abs(dy)) < r * 0.3) & (np.maximum(abs(dx), abs(dy)) < r),  # cross
                 (y / period + phase) % 1 < 0.5,                                      # hstripes
                 (x / period + phase) % 1 < 0.5,                                      # vstripes
                 ((x + y) / period + phase) % 1 < 0.5,                                # diagonal
                 ((x / period + phase) % 1 < 0.5) ^ ((y / period + phase) % 1 < 0.5),  # checker
                 ((x / period + phase) % 1 - 0.5) ** 2 + ((y / period + phase) % 1 - 0.5) ** 2 < 0.09]  # dots
        fg, bg = rng.uniform(0, 1, size=(2, 3, 1, 1))
        bg = np.where(abs(fg - bg) < 0.3, 1 - fg, bg)    # keep foreground and background apart
        img = np.where(masks[label], fg, bg) + rng.normal(0, 0.03, size=(3, s, s))
        return (np.clip(img, 0, 1) * 255).astype(np.uint8)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


# ---- Image folders: listed without loops, every image checked before training ------------------
class UnreadableImage(UsageError, OSError):
    """An image file that cannot be decoded: the user's to repair, and a file that failed mid-run (the OSError
    that main answers by saying the checkpoint on disk is kept)."""


class ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's, but links to other folders inside a class folder are not followed (they can loop forever,
    or list images twice), hidden files and folders (.ipynb_checkpoints, macOS's ._ files) are skipped, every
    image's header is read once up front, and images of any bit depth decode to 8-bit RGB with their contrast:
    a broken file is one clear error, up front or when its pixels are read."""

    def __init__(self, root):
        from PIL import Image
        super().__init__(root, loader=ImageFolder.read)
        tick = time.time()
        for i, (path, _) in enumerate(self.samples):
            try:
                Image.open(path).close()
            except (OSError, ValueError) as err:  # not an image, truncated, a dangling link, unreadable
                raise UnreadableImage(f"cannot read the image {path} ({type(err).__name__}); repair or remove it")
            if time.time() - tick > 10:  # a line every 10 s on large folders
                print(f"checked {i + 1}/{len(self.samples)} images", flush=True)
                tick = time.time()

    @staticmethod
    def read(path):
        """The image at path as an 8-bit RGB PIL image. 16-bit images (modes I;16*, and I with values up to 65535,
        as older Pillows open 16-bit PNGs) are scaled by 255 / 65535: convert("RGB") would clip them to white."""
        from PIL import Image
        try:
            with Image.open(path) as img:
                img.load()  # the pixels: a file whose header reads may still be truncated
                if img.mode.startswith("I;16") or img.mode == "I":
                    pixels = np.asarray(img).astype(np.int64)
                    if pixels.min() < 0 or pixels.max() > 65535:
                        raise ValueError(f"{img.mode} values outside 0..65535")
                    img = Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8), "L")
                elif img.mode == "F":
                    raise ValueError("floating-point pixels, of no fixed range")
                return img.convert("RGB")
        except Exception as err:  # truncated, corrupt, gone since the listing: PIL raises many kinds
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UnreadableImage(f"cannot decode the image {path} ({reason}); repair or remove it, or save it "
                                  f"with 8 or 16 bits per channel") from None

    @staticmethod
    def find_classes(directory):
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"no class folder in {directory}")
        return classes, {name: i for i, name in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        samples = []
        for name, label in sorted(class_to_idx.items()):
            for root, folders, files in os.walk(os.path.join(directory, name)):  # links to folders: not followed
                folders[:] = sorted(f for f in folders if not f.startswith("."))  # in place: os.walk skips the rest
                samples += [(os.path.join(root, file), label) for file in sorted(files) if not file.startswith(".")
                            and file.lower().endswith(torchvision.datasets.folder.IMG_EXTENSIONS)]
        return samples


# ---- SimCLR's augmentation on the device, a batch at a time (--gpu-augment) --------------------
# ssl_augmentation batched: the same steps, constants and distributions, each image with its own draws. The
# randomness all comes from uniform() with `generator`, on the images' device: seeded, it makes runs repeatable.
def uniform(x, generator, *shape):  # U[0, 1) of the given shape, on the device of x
    return torch.rand(*shape, generator=generator, device=x.device)

@functools.cache
def on_device(values, device):  # a constant, copied to the device once: each copy would make the host wait
    return torch.tensor(values, device=device)

def random_resized_crop_flip(x, size, scale=CROP_SCALE, ratio=(3 / 4, 4 / 3), generator=None):
    """RandomResizedCrop + RandomHorizontalFlip as in torchvision, float (B, C, H, W) -> (B, C, size, size)."""
    B, _, H, W = x.shape
    u = uniform(x, generator, B, 10, 2)
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])  # log-uniform aspect ratio
    w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (w >= 1) & (w <= W) & (h >= 1) & (h <= H)
    first = fits.int().argmax(dim=1, keepdim=True)  # each image keeps the first of its 10 draws that fits
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    ok = fits.any(dim=1)  # else a central crop of the whole image, clamped to the allowed aspect ratios
    w = torch.where(ok, w, round(H * ratio[1]) if W / H > ratio[1] else W)
    h = torch.where(ok, h, round(W / ratio[0]) if W / H < ratio[0] else H)
    pos = uniform(x, generator, B, 2)  # top-left corner: uniform over the integer positions, as in torchvision
    left = torch.where(ok, torch.floor(pos[:, 0] * (W - w + 1)), (W - w) // 2)
    top = torch.where(ok, torch.floor(pos[:, 1] * (H - h + 1)), (H - h) // 2)
    # Bilinear resize of the box, torchvision's half-pixel convention: output pixel i reads input
    # x = left + (i + 0.5) * w / size - 0.5, clamped to the box (as if the crop were cut out first).
    centres = (torch.arange(size, device=x.device) + 0.5) / size
    xs = (left[:, None] + centres * w[:, None] - 0.5).clamp(left[:, None], (left + w - 1)[:, None])
    ys = (top[:, None] + centres * h[:, None] - 0.5).clamp(top[:, None], (top + h - 1)[:, None])
    xs = torch.where(uniform(x, generator, B, 1) < 0.5, xs.flip(1), xs)  # flip: read the columns right to left
    # grid_sample wants (x, y) in [-1, 1], -1 and 1 the outer pixel edges (align_corners=False).
    grid = torch.stack(torch.broadcast_tensors((2 * xs[:, None, :] + 1) / W - 1,
                                               (2 * ys[:, :, None] + 1) / H - 1), dim=-1)
    # Plain bilinear: torchvision antialiases shrunk crops, a small change here (none on CIFAR: crops only grow).
    return F.grid_sample(x, grid, mode="bilinear", align_corners=False)

def _gray(x):  # (B, 3, H, W) -> (B, 1, H, W); torchvision's weights (0.2989, not the usual 0.299)
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]

def _shift_hue(x, shift):
    """Rotate the hue of RGB images in [0, 1] by shift (B, 1, 1) turns, keeping saturation and value."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    chroma = v - x.amin(1)
    c = torch.where(chroma > 0, chroma, 1.0)  # gray pixels: avoid 0/0 (their hue does not matter)
    hue = torch.where(r == v, (g - b) / c, torch.where(g == v, 2 + (b - r) / c, 4 + (r - g) / c))
    hue6 = (hue + 6 * shift) % 6  # the new hue, in sixths of a turn
    s = chroma / torch.where(v > 0, v, 1.0)
    # HSV -> RGB: channel n (5 for R, 3 for G, 1 for B) is v * (1 - s * clamp(min(k, 4 - k), 0, 1)).
    k = (on_device((5.0, 3.0, 1.0), x.device).view(1, 3, 1, 1) + hue6[:, None]) % 6
    return v[:, None] * (1 - s[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1))

def color_jitter_grayscale(x, jitter=JITTER, p_jitter=P_JITTER, p_gray=P_GRAY, generator=None):
    """RandomApply(ColorJitter(*jitter), p=p_jitter) then RandomGrayscale(p=p_gray), jitter <= 1."""
    B = x.shape[0]
    # Brightness, contrast, saturation factors ~ U[1 - j, 1 + j] (a 4th, unused, keeps indexing simple).
    factors = 1 + on_device((*jitter[:3], 0.0), x.device) * (2 * uniform(x, generator, B, 4) - 1)
    hue = jitter[3] * (2 * uniform(x, generator, B, 1, 1) - 1)  # in turns, ~ U[-j, j]
    order = uniform(x, generator, B, 4).argsort(dim=1)  # a random permutation per image
    out = x
    for step in range(4):
        op = order[:, step].view(B, 1, 1, 1)  # 0 brightness, 1 contrast, 2 saturation, 3 hue
        # The first three blend the image with a reference: black, the mean gray level, the gray image.
        gray = _gray(out)
        ref = torch.where(op == 0, 0.0, torch.where(op == 1, gray.mean((2, 3), keepdim=True), gray))
        f = factors.gather(1, order[:, step:step + 1]).view(B, 1, 1, 1)
        new = torch.lerp(ref, out, f).clamp(0, 1)  # f * out + (1 - f) * ref, clamped as in torchvision
        # Every image's hue shifted, then kept where it is hue's turn: indexing just those would wait for the GPU.
        out = torch.where(op == 3, _shift_hue(out, hue), new)
    out = torch.where(uniform(x, generator, B, 1, 1, 1) < p_jitter, out, x)
    return torch.where(uniform(x, generator, B, 1, 1, 1) < p_gray, _gray(out).expand_as(out), out)

def _random_blur(x, kernel_size, generator=None):
    """With p=P_BLUR per image, a Gaussian blur with its own sigma ~ U[BLUR_SIGMA], reflect padding."""
    B, C, H, W = x.shape
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * uniform(x, generator, B, 1)
    t = torch.arange(kernel_size, device=x.device) - kernel_size // 2
    kernel = torch.softmax(-0.5 * (t / sigma) ** 2, dim=1).repeat_interleave(C, dim=0)  # (B*C, K)
    # One depthwise conv over all B*C channels applies each image's own kernel: vertical, then horizontal.
    y = F.pad(x.reshape(1, B * C, H, W), [kernel_size // 2] * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(B * C, 1, kernel_size, 1), groups=B * C)
    y = F.conv2d(y, kernel.view(B * C, 1, 1, kernel_size), groups=B * C).view(B, C, H, W)
    return torch.where(uniform(x, generator, B, 1, 1, 1) < P_BLUR, y, x)

def batch_ssl_augmentation(images, img_size, mean, std, generator=None):
    """uint8 or [0, 1] float (B, 3, H, W), on any device -> normalised float32 (B, 3, img_size, img_size)."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    x = random_resized_crop_flip(x, img_size, generator=generator)
    x = color_jitter_grayscale(x, generator=generator)
    if blur_kernel_size(img_size):
        x = _random_blur(x, blur_kernel_size(img_size), generator=generator)
    return v2.functional.normalize(x, mean, std)


if __name__ == "__main__":
    main()
