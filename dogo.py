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
    torchrun --standalone --nproc_per_node=8 dogo.py --batch-size 256   # 8 GPUs, 32 images each
    python dogo.py --benchmark --batch-size 64          # where the time of a step goes

Outputs in --out-dir: metrics.csv, losses.png, checkpoint.pt; evaluate with eval_linear.py.
"""
import argparse
import contextlib
import csv
import dataclasses
import functools
import json
import math
import os
import resource
import signal
import sys
import tempfile
import time
from collections import namedtuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2


# ---- Config ------------------------------------------------------------------------------------
ARCHS = ("resnet18", "resnet34", "resnet50", "wrn10_2", "wrn16_2", "wrn16_4", "wrn16_8", "wrn28_2",
         "mobilenetv2", "shufflenetv2")
OBJECTIVES = ("simclr", "simsiam")
FIXED_ON_RESUME = ("arch", "peer", "objective", "peer_objective", "dataset", "img_size", "proj_dim")
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
    workers: int = flag(min(8, os.cpu_count() or 1), "loader processes (cores, up to 8); 0 = the main process")
    device: str = flag("auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    seed: int = flag(0, "seed for initialisation, data order and augmentations")
    out_dir: str = flag("", "where outputs go; '' = runs/DATASET_ARCH_PEER, or the --resume checkpoint's folder")
    resume: str = flag("", "checkpoint.pt to continue; flags given override its config, except networks and data")
    log_every: int = flag(50, "steps between progress lines and rows of metrics.csv")
    amp: bool = flag(None, "bfloat16 autocast for the networks, not the losses (default: only with CUDA)")
    compile: bool = flag(False, "torch.compile the networks: a slow first step, faster later ones")
    sync_bn: bool = flag(False, "under torchrun on GPUs: BatchNorm statistics over the global batch")
    gpu_augment: bool = flag(False, "augment batches on the device, not images in the loader (for fast GPUs)")
    benchmark: bool = flag(False, "instead of training, time a few steps at these settings on synthetic data")


def require(cfg, name, ok, what):
    """Refuse cfg.name unless ok(value), naming its flag and what it takes."""
    value = getattr(cfg, name)
    if not ok(value):
        raise UsageError(f"--{name.replace('_', '-')} must be {what}, got {value}")


def check_config(cfg):
    """Refuse the numbers that cannot work (argparse checks types and choices); nan and inf fail every check."""
    for name in ("lr", "temperature", "kd_temperature"):  # float32 weights: larger values overflow
        require(cfg, name, lambda v: 0 < v <= torch.finfo(torch.float32).max, "a positive float32 number")
    for name in ("weight_decay", "kd_weight", "peer_kd_weight", "img_size", "max_steps", "workers"):
        require(cfg, name, lambda v: 0 <= v < math.inf, "0 or more")
    for name in ("epochs", "proj_dim", "log_every"):
        require(cfg, name, lambda v: v >= 1, "at least 1")
    require(cfg, "batch_size", lambda v: v >= 2, "at least 2 (NT-Xent needs a negative)")
    require(cfg, "synthetic_size", lambda v: v >= 10, "at least 10")


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
    info = DATASETS[cfg.dataset]
    return torch.stack([batch_ssl_augmentation(batch[:, 0], cfg.img_size, info.mean, info.std)
                        for _ in range(2 if cfg.peer == "none" else 4)], dim=1)


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
    """A loss became NaN or infinite: the run stops before that step changes any weight."""


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
    """One DoGo step on views (B, 4 or 2, C, H, W): 0-1 the student's, 2-3 the peer's -> loss terms as floats."""
    amp = views.is_cuda if cfg.amp is None else cfg.amp
    ssl, s = ssl_loss(student, views[:, 0], views[:, 1], cfg.temperature, amp)
    terms, loss = {"ssl": ssl}, ssl
    if peer is not None:  # KL targets as the authors': the peer's [:2]; for a SimSiam network, the peer's [-2:]
        ssl_peer, q = ssl_loss(peer, views[:, 2], views[:, 3], cfg.temperature, amp)
        terms["kl"] = dogo_kl(*s[:2], *(q[-2:] if len(s) == 4 else q[:2]), cfg.kd_temperature)  # student
        terms["ssl_peer"] = ssl_peer
        terms["kl_peer"] = dogo_kl(*q[:2], *(s[-2:] if len(q) == 4 else s[:2]), cfg.kd_temperature)  # peer
        loss = loss + cfg.kd_weight * terms["kl"] + ssl_peer + cfg.peer_kd_weight * terms["kl_peer"]
    if not torch.isfinite(loss):
        raise NonFiniteLoss(", ".join(f"{k} {v.item():.4g}" for k, v in terms.items()))
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()  # dogo_kl detaches its target: each network gets exactly the gradient of its own loss
    for opt in optimizers:
        opt.step()
    return {k: v.item() for k, v in terms.items()}


# ---- The training loop and its checkpoints -----------------------------------------------------
def save_checkpoint(path, cfg, step, student, peer, optimizers, epoch=0, images=0):
    """Atomically (temporary file, then rename), only tensors and plain values: loads with weights_only=True.
    epoch: epochs completed; images: those of the next epoch already trained (a resume may change the batch)."""
    state = dict(config=dataclasses.asdict(cfg), step=step, epoch=epoch, images=images,
                 student=student.state_dict(), student_opt=optimizers[0].state_dict(),
                 peer=peer.state_dict() if peer else None, peer_opt=optimizers[1].state_dict() if peer else None,
                 rng_cpu=torch.get_rng_state(),  # the augmentations draw from it
                 rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    try:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    except OSError as err:  # a full disk, say: the temporary file would keep the space the next save needs
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise UsageError(f"cannot save {path} ({err.strerror or err}); the previous checkpoint is left as "
                         f"it was: free some space, or resume it with another --out-dir") from None


def load_checkpoint(path, flag="--resume"):
    """A checkpoint written by save_checkpoint, read without executing any code it may hold."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file; give the checkpoint.pt that dogo.py wrote")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"{flag} {path}: cannot be read as a checkpoint ({type(err).__name__}); "
                         f"give a checkpoint.pt that dogo.py wrote") from None
    if not isinstance(ckpt, dict) or not {"config", "step", "student", "peer"} <= ckpt.keys():
        raise UsageError(f"{flag} {path}: not a dogo.py checkpoint (missing its config or networks)")
    return ckpt


def config_from_checkpoint(ckpt):
    """The Config a checkpoint was trained with (fields unknown to this version are dropped)."""
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in ckpt["config"].items() if k in known})


def resolve_config(cfg, given=frozenset()):
    """(the config to run, the checkpoint to resume or None). `given`: the command line's flags, which with
    --resume override the checkpoint's config, except FIXED_ON_RESUME (networks, data), which must agree."""
    check_config(cfg)
    cfg = dataclasses.replace(cfg, img_size=cfg.img_size or DATASETS[cfg.dataset].img_size)
    ckpt = load_checkpoint(cfg.resume) if cfg.resume else None
    if ckpt is not None:
        saved = config_from_checkpoint(ckpt)
        for name in FIXED_ON_RESUME:
            if name in given and getattr(cfg, name) != getattr(saved, name):
                raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)} differs from the "
                                 f"checkpoint's {getattr(saved, name)}; drop the flag to resume, "
                                 f"or start a new run without --resume")
        cfg = dataclasses.replace(saved, **{k: getattr(cfg, k) for k in given if k not in FIXED_ON_RESUME})
        if "out_dir" not in given:
            cfg.out_dir = os.path.dirname(os.path.abspath(cfg.resume))
    cfg.out_dir = cfg.out_dir or os.path.join("runs", f"{cfg.dataset}_{cfg.arch}_{cfg.peer}")
    return cfg, ckpt


def restore(ckpt, student, peer, optimizers, cfg, device):
    """Load the networks, their optimisers and the RNG state from a checkpoint -> (step, epoch, images)."""
    if (ckpt["peer"] is None) != (peer is None):
        raise UsageError(f"--resume {cfg.resume}: its peer does not match --peer {cfg.peer}")
    for net, opt, name in zip((student, peer), optimizers, ("student", "peer")):
        net.load_state_dict(ckpt[name])
        opt.load_state_dict(ckpt[name + "_opt"])
        for group in opt.param_groups:  # a --lr given now wins over the saved one
            group["lr"] = cfg.lr
    torch.set_rng_state(ckpt["rng_cpu"])
    if device.type == "cuda" and ckpt["rng_cuda"]:
        torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
    return ckpt["step"], ckpt["epoch"], ckpt.get("images", 0)


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
        raise UsageError(f"--batch-size {cfg.batch_size} exceeds the {len(data)} training images; use a smaller one")
    student, peer = networks_on(device, cfg)
    optimizers = build_optimizers([student, peer], cfg)
    step, epoch, done = restore(ckpt, student, peer, optimizers, cfg, device) if ckpt else (0, 0, 0)
    # Position in images, not steps: a resumed run may use another --batch-size.
    left = (cfg.epochs - epoch) * steps_per_epoch - (done // cfg.batch_size if epoch < cfg.epochs else 0)
    total_steps = min(step + max(left, 0), cfg.max_steps or math.inf)
    run_student, run_peer = (runner(net, cfg, device, world) for net in (student, peer))
    if rank:  # other augmentations in each process (the weights stay in step through DDP)
        torch.manual_seed(seed_of(cfg, rank, step))
    loader = make_loader(data, cfg, device, rank, world, step)
    say = print if rank == 0 else lambda *args, **kwargs: None
    ckpt_path, csv_path, png_path = (os.path.join(cfg.out_dir, name) for name in OUTPUTS)
    where = f"{world} processes on {device.type}" if world > 1 else f"device {device}"
    say(f"DoGo: {cfg.arch} + peer {cfg.peer} on {cfg.dataset} ({len(data)} images, {cfg.img_size} px), batch "
        f"{cfg.batch_size}, {steps_per_epoch} steps/epoch, steps {step} -> {total_steps}, {where}, out-dir "
        f"{cfg.out_dir}", flush=True)
    if step >= total_steps:
        say(f"nothing to do: the checkpoint is at step {step}; raise --epochs or --max-steps")
        return student, peer
    with claim_out_dir(cfg.out_dir) if rank == 0 else contextlib.nullcontext(), StopOnCtrlC(rank > 0) as ctrl_c:
        log, stop, views = Progress(csv_path, cfg, step, total_steps), False, None
        while epoch < cfg.epochs and step < total_steps and not stop:
            loader.sampler.start(epoch, skip=done // world)
            for batch, _ in loader:
                views = to_views(batch, cfg, device)
                try:
                    terms = train_step(run_student, run_peer, optimizers, views, cfg)
                except NonFiniteLoss as err:  # the checkpoint on disk is the last good state
                    raise NonFiniteLoss(f"loss is not finite at step {step + 1} ({err}); stopped before updating "
                                        f"the weights or the checkpoint; {likely_cause(cfg)}") from None
                log.interval.append(terms)
                step, done = step + 1, done + cfg.batch_size
                stop = ctrl_c.anywhere(device)
                if rank == 0 and (step % cfg.log_every == 0 or step == total_steps or stop):
                    log.write(epoch + 1, step)
                if step == total_steps or stop:
                    break
            else:  # the epoch ran to its end
                epoch, done = epoch + 1, 0
            if len(data) - done < cfg.batch_size:  # the run's last step ended an epoch
                epoch, done = epoch + 1, 0
            if rank == 0:  # end of an epoch, of the run, or Ctrl-C
                if views is not None:
                    check_outputs([student, peer], views, cfg, step)
                save_checkpoint(ckpt_path, cfg, step, student, peer, optimizers, epoch, done)
                plot_losses(log.rows, png_path)
    if stop:
        say(f"interrupted at step {step}: saved {ckpt_path}; continue with python dogo.py --resume {ckpt_path}")
        sys.exit(130)
    say(f"done: {ckpt_path}, {csv_path}, {png_path}")
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
                                f"saving them (the checkpoint on disk is the last good state); {likely_cause(cfg)}")


def main(argv=None):
    """The command line: train, or --benchmark. Errors the user can fix: one line, exit 2."""
    try:
        cfg, given = parse_flags(Config, argv, "dogo.py", __doc__.splitlines()[0])
        cfg, ckpt = resolve_config(cfg, given)
        rank, world, device = init_distributed(cfg)
        torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed sizes: cuDNN picks its kernels once
        if cfg.benchmark:
            benchmark(cfg, rank, world, device)
        else:
            train(cfg, ckpt, rank, world, device)
    except (UsageError, NonFiniteLoss, OSError) as err:  # OSError: a file that failed mid-run (an image, the disk)
        if int(os.environ.get("RANK", 0)):  # torchrun stops all processes when the first one
            time.sleep(5)                   # ends: let process 0 say it, once, when all agree
        kept = "; the last checkpoint on disk is kept" if isinstance(err, OSError) else ""
        print(f"dogo.py: error: {str(err).strip().splitlines()[-1]}{kept}", file=sys.stderr)  # a worker's: last
        sys.exit(1 if isinstance(err, NonFiniteLoss) else 2)
    except KeyboardInterrupt:  # the first Ctrl-C saves and exits in train; this is a second one, or an early one
        print("dogo.py: stopped by Ctrl-C without saving; the last checkpoint on disk is kept", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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
                      worker_init_fn=ignore_ctrl_c)


# ---- Ctrl-C, the output folder, the metrics log and its plot -----------------------------------
def ignore_ctrl_c(worker_id):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle


class StopOnCtrlC:
    """First Ctrl-C: stop after this step and save; a second one aborts. quiet: no message (ranks > 0)."""

    def __init__(self, quiet=False):
        self.quiet, self.requested = quiet, False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_):
        self.requested = True
        if not self.quiet:
            print("\nCtrl-C: saving after this step (Ctrl-C again aborts without saving)", flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *_):
        signal.signal(signal.SIGINT, self.previous)

    def anywhere(self, device):
        """Whether any process got a Ctrl-C: all must stop at the same step."""
        requested = self.requested
        if dist.is_initialized():
            requested = torch.tensor(float(requested), device=device)
            dist.all_reduce(requested, op=dist.ReduceOp.MAX)
        return bool(requested)


@contextlib.contextmanager
def claim_out_dir(path):
    """Make --out-dir, check that it takes the outputs, and hold it for this run: a lock file with the process
    id; another run there ends with one line, and a lock whose process has ended is replaced."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
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
        try:  # signal 0 sends nothing: it only asks whether the owner still runs
            os.kill(int(owner), 0)
        except (ValueError, ProcessLookupError):  # no process id, or its run ended without removing the lock
            os.remove(lock)
            continue
        except PermissionError:  # it runs, under another user
            pass
        raise UsageError(f"--out-dir {path} is in use by another run (process {owner}, see {lock}); "
                         f"wait for it to end, or give another --out-dir")
    try:
        yield
    finally:
        os.remove(lock)


class Progress:
    """Averages the loss terms over each --log-every interval into a printed line and a row of metrics.csv. A
    resumed run keeps the rows up to its checkpoint's step: it drops those of steps that a crash lost."""

    def __init__(self, csv_path, cfg, step, total_steps):
        self.csv_path, self.cfg, self.total_steps, self.rows = csv_path, cfg, total_steps, []
        self.interval, self.tick = [], time.time()  # interval: the loss terms of each step since the last write
        if step and os.path.exists(csv_path):
            with open(csv_path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]

    def write(self, epoch, step):
        speed = len(self.interval) * self.cfg.batch_size / (time.time() - self.tick)
        means = {k: sum(t[k] for t in self.interval) / len(self.interval) for k in self.interval[0]}
        self.rows.append({"epoch": epoch, "step": step, **means, "images_per_s": speed})
        with open(self.csv_path + ".tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[-1]))
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(self.csv_path + ".tmp", self.csv_path)
        eta = (self.total_steps - step) * self.cfg.batch_size / speed
        print(f"epoch {epoch}/{self.cfg.epochs} step {step}/{self.total_steps} | "
              + " ".join(f"{k} {v:.4f}" for k, v in means.items())
              + f" | {speed:.1f} img/s | eta {eta // 3600:.0f}h{eta % 3600 // 60:02.0f}m", flush=True)
        self.interval, self.tick = [], time.time()


def plot_losses(rows, png_path):
    """losses.png from the rows of metrics.csv: each network's SSL term, and each one's KL term."""
    from matplotlib.figure import Figure  # no pyplot: works headless and leaves notebooks alone
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, term in zip(fig.subplots(1, 2), ("ssl", "kl")):
        for key, who in ((term, "student"), (f"{term}_peer", "peer")):
            if key in rows[0]:
                ax.plot(steps, [float(r[key]) for r in rows], label=who,
                        marker="o" if len(rows) < 30 else None)  # a lone point shows too
        ax.set(title={"ssl": "SSL loss", "kl": "KL to the peer"}[term], xlabel="step", ylabel="loss")
        if ax.lines:
            ax.legend()
    fig.savefig(png_path + ".tmp.png")
    os.replace(png_path + ".tmp.png", png_path)


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
class ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's, but links to other folders inside a class folder are not followed (they can loop forever,
    or list images twice), and every image's header is read once up front: a broken file is one clear error."""

    def __init__(self, root):
        from PIL import Image
        super().__init__(root)
        tick = time.time()
        for i, (path, _) in enumerate(self.samples):
            try:
                Image.open(path).close()
            except (OSError, ValueError) as err:  # not an image, truncated, a dangling link, unreadable
                raise UsageError(f"cannot read the image {path} ({type(err).__name__}); repair or remove it")
            if time.time() - tick > 10:  # a line every 10 s on large folders
                print(f"checked {i + 1}/{len(self.samples)} images", flush=True)
                tick = time.time()

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return [(os.path.join(root, file), label) for name, label in sorted(class_to_idx.items())
                for root, _, files in sorted(os.walk(os.path.join(directory, name)))
                for file in sorted(files) if file.lower().endswith(torchvision.datasets.folder.IMG_EXTENSIONS)]


# ---- --benchmark: where the time of a training step goes ---------------------------------------
def benchmark(cfg, rank=0, world=1, device=torch.device("cpu"), warmup=3):
    """--benchmark, on synthetic images: images/s of whole steps, of the loader and of train_step alone."""
    steps, drain = cfg.max_steps or 10, warmup + 2 * cfg.workers  # untimed: warm-up, the loader's queue
    data = training_set(SyntheticShapes(cfg.batch_size * (drain + steps), cfg.img_size), cfg)
    student, peer = networks_on(device, cfg)
    optimizers = build_optimizers([student, peer], cfg)
    run_student, run_peer = (runner(net, cfg, device, world) for net in (student, peer))
    loader = make_loader(data, cfg, device, rank, world)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None  # GPUs run asynchronously

    def images_per_s(use, batches):
        for i, batch in enumerate(batches):
            if i == drain:
                sync()
                tick = time.perf_counter()
            use(batch)
        sync()
        return cfg.batch_size * (i + 1 - drain) / (time.perf_counter() - tick)

    step = functools.partial(train_step, run_student, run_peer, optimizers, cfg=cfg)  # step(views)
    loader_speed = images_per_s(lambda batch: to_views(batch[0], cfg, device), loader)
    speed = images_per_s(lambda batch: step(to_views(batch[0], cfg, device)), loader)
    model_speed = images_per_s(step, [to_views(next(iter(loader))[0], cfg, device)] * (drain + steps))
    peak_mb = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
    result = dict(images_per_s=speed, loader_images_per_s=loader_speed, model_images_per_s=model_speed,
                  bound_by="data" if loader_speed < model_speed else "model", peak_mem_mb=peak_mb,
                  device=f"{world} x {device.type}" if world > 1 else str(device))
    result = {k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}
    if rank == 0:
        print(f"{cfg.arch} + peer {cfg.peer}, batch {cfg.batch_size} at {cfg.img_size} px, {cfg.workers} "
              f"loader workers: {steps} timed steps after {drain}\nbenchmark: {json.dumps(result)}", flush=True)
    return result


# ---- SimCLR's augmentation on the device, a batch at a time (--gpu-augment) --------------------
# ssl_augmentation batched: the same steps, constants and distributions, each image with its own draws. The
# randomness all comes from uniform() with `generator`, on the images' device: seeded, it makes runs repeatable.
def uniform(x, generator, *shape):  # U[0, 1) of the given shape, on the device of x
    return torch.rand(*shape, generator=generator, device=x.device)


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
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + hue6[:, None]) % 6
    return v[:, None] * (1 - s[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1))


def color_jitter_grayscale(x, jitter=JITTER, p_jitter=P_JITTER, p_gray=P_GRAY, generator=None):
    """RandomApply(ColorJitter(*jitter), p=p_jitter) then RandomGrayscale(p=p_gray), jitter <= 1."""
    B = x.shape[0]
    # Brightness, contrast, saturation factors ~ U[1 - j, 1 + j] (a 4th, unused, keeps indexing simple).
    factors = 1 + torch.tensor([*jitter[:3], 0.0], device=x.device) * (2 * uniform(x, generator, B, 4) - 1)
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
