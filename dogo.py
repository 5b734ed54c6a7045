"""Distill on the Go (DoGo): online knowledge distillation for self-supervised learning.

Bhat, Arani, Zonooz. "Distill on the Go: Online knowledge distillation in self-supervised
learning", CVPR 2021 workshop on Learning from Limited and Imperfect Data, arXiv:2104.09866.

Two networks learn from scratch at the same time, without labels. Each one solves SimCLR (or
SimSiam) on its own two views of every image, and also learns to agree with its peer on how
similar the images of a batch are to each other (deep mutual learning on similarity scores):

    L_k = NT-Xent_k  +  lambda_k * KL( P_peer || P_k )      (P: row-softmax of cross-view cosines)

Usage:
    python dogo.py --arch resnet18 --peer resnet50                  # the paper's set-up, CIFAR-10
    python dogo.py --arch resnet18 --peer none                      # solo SimCLR baseline
    python dogo.py --arch wrn16_2 --peer resnet50 --peer-objective simsiam   # other pairings
    python dogo.py --dataset synthetic --img-size 16 --synthetic-size 512 --batch-size 64 \
        --arch resnet18 --peer resnet18 --epochs 5                  # offline demo, 2 min on a CPU
    python dogo.py --resume runs/cifar10_resnet18_resnet50/checkpoint.pt --epochs 400
    torchrun --standalone --nproc_per_node=8 dogo.py --batch-size 256   # 8 GPUs, 32 images each
    python dogo.py --benchmark --batch-size 64                      # where the time of a step goes

Outputs in --out-dir: metrics.csv, losses.png, checkpoint.pt. Evaluate with eval_linear.py.
File layout, in the paper's order: config, data and augmentations, networks, losses, training.
How it runs (flags, processes, logs; the augmentations batched on the GPU) is in runtime.py.
"""
import dataclasses
import json
import os
import sys
import time
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from runtime import (EpochOrder, Progress, StopOnCtrlC, SyntheticShapes, UsageError, any_process,
                     batch_ssl_augmentation, check_flags, device_flag, flag, gather, ignore_ctrl_c,
                     init_distributed, parse_flags, peak_memory_mb, plot_losses, read_metrics,
                     summed_over_processes, time_calls, workers_flag, world_size)


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
ARCHS = ("resnet18", "resnet34", "resnet50", "wrn10_2", "wrn16_2", "wrn16_4", "wrn16_8", "wrn28_2",
         "mobilenetv2", "shufflenetv2")
OBJECTIVES = ("simclr", "simsiam")


# Per dataset: native resolution, and the per-channel mean and std that normalise its images.
DatasetInfo = namedtuple("DatasetInfo", "img_size mean std")


DATASETS = {
    "cifar10": DatasetInfo(32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo(32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": DatasetInfo(96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagefolder": DatasetInfo(64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
    "synthetic": DatasetInfo(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


@dataclass
class Config:
    # what to train
    arch: str = flag("resnet18", "the small network, the one DoGo is for", ARCHS)
    peer: str = flag("resnet50", "its peer, trained alongside; none: the arch alone, the baseline "
                     "that DoGo is compared against", ARCHS + ("none",))
    objective: str = flag("simclr", "the arch's self-supervised task", OBJECTIVES)
    peer_objective: str = flag("", "the peer's task; '' = the same as --objective", OBJECTIVES + ("",))
    # data
    dataset: str = flag("cifar10", "what to train on; synthetic is built in, for offline use", tuple(DATASETS))
    data_dir: str = flag("./data", "where datasets are downloaded to, or the image folder "
                         "(with train/ and test/ or val/, one sub-folder per class)")
    img_size: int = flag(0, "training resolution; 0 = the dataset's own (32 for CIFAR and "
                         "synthetic, 96 for STL-10, 64 for imagefolder)", at_least=0)
    synthetic_size: int = flag(2000, "images in the synthetic training split (test: a quarter)",
                               at_least=10)
    # optimisation (the paper's published configuration)
    epochs: int = flag(200, "passes over the data; 200 is the usual budget of SSL studies on "
                       "CIFAR-sized data, and SSL keeps improving with longer schedules", at_least=1)
    max_steps: int = flag(0, "stop after this many training steps in total, counted across "
                          "resumes; 0 = no cap (for quick runs)", at_least=0)
    batch_size: int = flag(256, "images per step, each giving 4 views; NT-Xent needs 2 or more",
                           at_least=2)
    lr: float = flag(3e-4, "Adam learning rate, for both networks", above=0)
    weight_decay: float = flag(1e-6, "Adam weight decay", at_least=0)
    temperature: float = flag(0.5, "NT-Xent temperature", above=0)
    kd_temperature: float = flag(0.1, "temperature of the similarity distributions in the KL term",
                                 above=0)
    kd_weight: float = flag(0.390625, "weight of the arch's KL term (KL averaged over rows); "
                            "0.390625 = 100/256, the authors' weight of 100 with their "
                            "N*N reduction at batch 256", at_least=0)
    peer_kd_weight: float = flag(0.00390625, "weight of the peer's KL term; 0.00390625 = 1/256, "
                                 "the authors' weight of 1 at batch 256", at_least=0)
    proj_dim: int = flag(128, "size of SimCLR's projection, which the losses see", at_least=1)
    # running
    workers: int = workers_flag()
    device: str = device_flag()
    seed: int = flag(0, "seed for initialisation, data order and augmentations")
    out_dir: str = flag("", "where metrics, plot and checkpoint go; '' = runs/DATASET_ARCH_PEER, "
                        "or the checkpoint's folder with --resume")
    resume: str = flag("", "checkpoint.pt to continue from; flags given now override its config, "
                       "except those that define the networks and data")
    log_every: int = flag(50, "steps between progress lines and rows of metrics.csv", at_least=1)
    # speed (none of these changes the method)
    amp: bool = flag(None, "bfloat16 autocast for the networks, the losses staying in float32 "
                     "(default: on with CUDA, off on CPU)")
    compile: bool = flag(False, "torch.compile the networks: a slow first step, faster later ones")
    sync_bn: bool = flag(False, "under torchrun on GPUs: BatchNorm statistics over the global batch")
    gpu_augment: bool = flag(False, "augment on the training device, a batch at a time, instead of "
                             "per image in the loader processes: for GPUs that the CPU cannot feed")
    benchmark: bool = flag(False, "instead of training, time the parts of a few steps on synthetic "
                           "data at this --arch, --peer, --batch-size and --img-size")


# A resumed run must rebuild exactly the same networks on the same data.
FIXED_ON_RESUME = ("arch", "peer", "objective", "peer_objective", "dataset", "img_size", "proj_dim")


def config_from_checkpoint(ckpt):
    """The Config a checkpoint was trained with (fields unknown to this version are dropped)."""
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in ckpt["config"].items() if k in known})


# ------------------------------------------------------------------------------------------------
# Data and augmentations (the synthetic dataset for offline runs: runtime.py)
# ------------------------------------------------------------------------------------------------
def load_dataset(name, data_dir, split, synthetic_size=2000, img_size=32):
    """The raw (image, label) dataset of one split: 'ssl' (what self-supervision trains on),
    'train' (the labelled training images) or 'test'. STL-10's 'ssl' adds its unlabeled split."""
    if name == "synthetic":
        n = synthetic_size if split != "test" else max(synthetic_size // 4, 10)
        return SyntheticShapes(n, img_size, train=split != "test")
    try:
        if name in ("cifar10", "cifar100"):
            cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            return cls(data_dir, train=split != "test", download=True)
        if name == "stl10":
            stl_split = {"ssl": "train+unlabeled", "train": "train", "test": "test"}[split]
            return torchvision.datasets.STL10(data_dir, split=stl_split, download=True)
        folders = ["train"] if split != "test" else ["test", "val"]
        for folder in folders:
            if os.path.isdir(os.path.join(data_dir, folder)):
                return torchvision.datasets.ImageFolder(os.path.join(data_dir, folder))
        raise FileNotFoundError(f"no {' or '.join(f + '/' for f in folders)} folder")
    except Exception as err:  # offline, missing, corrupt: all end the same way for the user
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"cannot load {name} ({split} split) from --data-dir {data_dir}: {reason}; "
                         f"put the data there, or run offline with --dataset synthetic") from None


def ssl_augmentation(img_size, dataset):
    """SimCLR's augmentations (Chen et al. 2020, Appendix A), ending in a normalised tensor."""
    info = DATASETS[dataset]
    blur = []
    if img_size >= 64:  # blur destroys the little detail that 32 px images have, so SimCLR skips it
        kernel = int(0.1 * img_size) // 2 * 2 + 1  # odd, about 10% of the image
        blur = [v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5)]
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(img_size, scale=(0.08, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        *blur,
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(info.mean, info.std),
    ])


def eval_transform(img_size, dataset):
    """No augmentation: resize and centre-crop to the training size, then normalise."""
    info = DATASETS[dataset]
    return v2.Compose([v2.ToImage(), v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(info.mean, info.std)])


def views_per_image(cfg):
    """4: each network draws its own pair of views (the paper's Figure 1); 2 for a network alone."""
    return 2 if cfg.peer == "none" else 4


def ssl_views(base, cfg):
    """The training set: 4 augmented views of each image (2 with --peer none); with --gpu-augment,
    the image alone, at the training size, for ready_views to augment on the device."""
    if cfg.gpu_augment:
        sized = v2.Compose([v2.ToImage(), v2.Resize(cfg.img_size, antialias=True), v2.CenterCrop(cfg.img_size)])
        return Views(base, sized, 1)
    return Views(base, ssl_augmentation(cfg.img_size, cfg.dataset), views_per_image(cfg))


def ready_views(batch, cfg, device):
    """A batch from the loader -> its views (B, 4 or 2, C, H, W) on the device."""
    batch = batch.to(device, non_blocking=True)  # from pinned memory: the copy overlaps compute
    if not cfg.gpu_augment:
        return batch
    info = DATASETS[cfg.dataset]
    return torch.stack([batch_ssl_augmentation(batch[:, 0], cfg.img_size, info.mean, info.std)
                        for _ in range(views_per_image(cfg))], dim=1)


class Views(Dataset):
    """Each item: (n_views x C x H x W tensor of independently augmented views, label).

    DoGo uses four views per image: two for each network. Each network draws its own pair, so
    neither can match its peer by seeing the same pixels (the paper's Figure 1)."""

    def __init__(self, base, transform, n_views):
        self.base, self.transform, self.n_views = base, transform, n_views

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        return torch.stack([self.transform(img) for _ in range(self.n_views)]), label


# ------------------------------------------------------------------------------------------------
# Networks: encoder f (the backbone) and projection head g
# ------------------------------------------------------------------------------------------------
class WideBlock(nn.Module):
    """Pre-activation residual block of a WideResNet: BN-ReLU-conv, twice."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(c_in, c_out, 1, stride, bias=False)
                         if stride != 1 or c_in != c_out else None)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return y + (x if self.shortcut is None else self.shortcut(a))


def wide_resnet(depth, width):
    """WRN-depth-width (Zagoruyko & Komodakis 2016): three groups of (depth - 4) / 6 blocks with
    16w, 32w and 64w channels, the last two at stride 2. Made for 32 px images."""
    blocks, c_in = [], 16
    for group, c_out in enumerate((16 * width, 32 * width, 64 * width)):
        for b in range((depth - 4) // 6):
            blocks.append(WideBlock(c_in, c_out, stride=2 if group > 0 and b == 0 else 1))
            c_in = c_out
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), *blocks, nn.BatchNorm2d(c_in),
                         nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def make_encoder(arch, img_size):
    """The backbone without its classifier: (B, 3, S, S) -> (B, feature size). Returns
    (encoder, feature size); the size is measured on a dummy image, not looked up per name.

    Below 100 px the ImageNet stems (stride-2 convolution, then max-pool) would shrink a 32 px
    image to 8 px before the first block, so small images keep their resolution through the stem:
    ResNets get the CIFAR stem (one 3x3 stride-1 conv, no max-pool), MobileNetV2 and
    ShuffleNetV2 a stride-1 first convolution (and no max-pool). WideResNets are CIFAR networks."""
    small = img_size < 100
    if arch.startswith("wrn"):
        depth, width = (int(n) for n in arch[3:].split("_"))
        net = wide_resnet(depth, width)
    elif arch.startswith("resnet"):
        net = getattr(torchvision.models, arch)(weights=None)
        if small:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        net.fc = nn.Identity()
    elif arch == "mobilenetv2":
        net = torchvision.models.mobilenet_v2(weights=None)
        if small:
            net.features[0][0].stride = (1, 1)
        net.classifier = nn.Identity()
    elif arch == "shufflenetv2":
        net = torchvision.models.shufflenet_v2_x1_0(weights=None)
        if small:
            net.conv1[0].stride = (1, 1)
            net.maxpool = nn.Identity()
        net.fc = nn.Identity()
    else:
        raise UsageError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    with torch.no_grad():
        feature_dim = net.eval()(torch.zeros(1, 3, img_size, img_size)).shape[1]
    return net.train(), feature_dim


class SSLNet(nn.Module):
    """Encoder f, projection head g and, for SimSiam, predictor h.

    forward(x) gives what the losses take: the projection z = g(f(x)), before normalisation, and
    for SimSiam the prediction h(z) (None for SimCLR); self.encoder(x) gives the representation
    that evaluation uses.
    SimCLR's head is the authors': Linear(f, 512, no bias) - BN - ReLU - Linear(512, proj_dim).
    SimSiam's (Chen & He 2021) is sized down for small images: a 512-d projector ending in BN and
    a 128-d predictor bottleneck."""

    def __init__(self, arch, img_size, proj_dim=128, objective="simclr", hidden_dim=512):
        super().__init__()
        self.arch, self.objective = arch, objective
        self.encoder, self.feature_dim = make_encoder(arch, img_size)
        block = lambda i, o: [nn.Linear(i, o, bias=False), nn.BatchNorm1d(o), nn.ReLU(inplace=True)]
        if objective == "simclr":  # no bias before BatchNorm: BN brings its own
            self.head = nn.Sequential(*block(self.feature_dim, hidden_dim), nn.Linear(hidden_dim, proj_dim))
            self.predictor = None
        else:
            self.head = nn.Sequential(*block(self.feature_dim, hidden_dim), *block(hidden_dim, hidden_dim)[:2])
            self.predictor = nn.Sequential(*block(hidden_dim, hidden_dim // 4), nn.Linear(hidden_dim // 4, hidden_dim))

    def project(self, x):                 # x: (B, 3, H, W)
        return self.head(self.encoder(x))  # (B, proj_dim)

    def forward(self, x):  # one call for the whole pass, which is what DDP and compile wrap
        z = self.project(x)
        return z, (None if self.predictor is None else self.predictor(z))


def build_optimizers(networks, cfg):
    """One Adam per network: each network is updated by its own optimiser, on its own loss."""
    return [torch.optim.Adam(n.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay) for n in networks]


def build_networks(cfg):
    """The arch network and its peer (None when training alone), as cfg describes them."""
    net = SSLNet(cfg.arch, cfg.img_size, cfg.proj_dim, cfg.objective)
    peer = (None if cfg.peer == "none"
            else SSLNet(cfg.peer, cfg.img_size, cfg.proj_dim, cfg.peer_objective or cfg.objective))
    return net, peer


# ------------------------------------------------------------------------------------------------
# Losses: pure functions of the projections (gathered over processes under torchrun: runtime.py)
# ------------------------------------------------------------------------------------------------
def nt_xent(z1, z2, temperature=0.5):
    r"""SimCLR's NT-Xent loss over the 2N views of one network (Chen et al. 2020, eq. 1).

    z1, z2: (N, d) projections of the two views of the same N images (row i of z1 and of z2
    come from image i). With s(a, b) the cosine similarity and t the temperature,

    .. math::
        \ell_i = -\log \frac{\exp(s(z_i, z_{i^+}) / t)}{\sum_{k \ne i} \exp(s(z_i, z_k) / t)},
        \qquad L = \frac{1}{2N} \sum_{i=1}^{2N} \ell_i

    over the 2N stacked views, where i^+ is the other view of image i: one positive and 2N - 2
    negatives per anchor. One (2N, 2N) matrix product: memory O(N^2), never an (N, N, d) tensor.
    Under torchrun, z1 and z2 are this process's n rows: its 2n anchors meet all 2N views.
    """
    n = z1.shape[0]
    anchors = F.normalize(torch.cat([z1, z2]), dim=1)                 # (2n, d) this process's views
    views = gather(anchors.view(2, n, -1).transpose(0, 1))            # (N, 2, d) all images, both views
    views = views.transpose(0, 1).flatten(0, 1)                       # (2N, d) first views, then second
    big_n = views.shape[0] // 2
    logits = anchors @ views.T / temperature                          # (2n, 2N)
    first = (dist.get_rank() * n if dist.is_initialized() else 0) + torch.arange(n, device=z1.device)
    itself, positive = torch.cat([first, first + big_n]), torch.cat([first + big_n, first])
    is_itself = torch.arange(2 * big_n, device=z1.device) == itself[:, None]
    logits = logits.masked_fill(is_itself, float("-inf"))             # k != i
    return summed_over_processes(F.cross_entropy(logits, positive, reduction="sum") / (2 * big_n))


def dogo_kl(z1, z2, z1_peer, z2_peer, temperature=0.1):
    r"""DoGo's distillation term KL(Q || P): this network's similarity distribution P is pulled
    towards its peer's, Q, which is a fixed target here (the peer side is detached).

    z1, z2: (N, d) this network's projections of its two views; z1_peer, z2_peer: the peer's,
    of its own two views of the same N images. With t = temperature,

    .. math::
        P_{ij} = \operatorname{softmax}_j\big(\cos(z^1_i, z^2_j) / t\big), \quad
        Q_{ij} = \operatorname{softmax}_j\big(\cos(z^{1,peer}_i, z^{2,peer}_j) / t\big), \quad
        \mathrm{KL}(Q \| P) = \frac{1}{N} \sum_{i=1}^{N} \sum_{j=1}^{N} Q_{ij} \log \frac{Q_{ij}}{P_{ij}}

    summed over each row j and averaged over the N rows (anchors): a true KL divergence per row.
    Under torchrun the rows are this process's images and the columns j those of the global batch.

    The authors' code computes ``kl_div(softmax(.).log(), Q)`` with PyTorch's default
    reduction='mean', which divides by N*N instead of N. So their weight lambda_official on that
    term equals lambda = lambda_official / N on this one: their 100 at N = 256 is 0.390625 here.
    log_softmax (not softmax().log()) keeps log P finite when a probability underflows.
    Which tensors enter for each objective (SimCLR: both projections; SimSiam: prediction of view
    1 and projection of view 2) is decided by ssl_forward; a mixed pair mixes them.
    """
    def log_similarity_distribution(a, b):                            # (n, N) row log-probabilities
        b = gather(F.normalize(b, dim=1))
        return F.log_softmax(F.normalize(a, dim=1) @ b.T / temperature, dim=1)

    log_p = log_similarity_distribution(z1, z2)
    # Stop-gradient: the peer is a teacher for this term only; it learns from its own term.
    log_q = log_similarity_distribution(z1_peer.detach(), z2_peer.detach())
    kl = F.kl_div(log_p, log_q, reduction="sum", log_target=True)     # summed over rows and j
    return summed_over_processes(kl / (z1.shape[0] * world_size()))   # / N: the mean over rows


def simsiam_loss(p1, p2, z1, z2):
    r"""SimSiam's symmetric loss (Chen & He 2021, eq. 1-2): each view's prediction p regresses
    the other view's projection z, which is a fixed target (stop-gradient, which is what keeps
    SimSiam from collapsing without negatives):

    .. math::  L = -\tfrac{1}{2}\cos(p_1, \mathrm{sg}(z_2)) - \tfrac{1}{2}\cos(p_2, \mathrm{sg}(z_1))

    averaged over the batch (the global one under torchrun). p1, p2, z1, z2: (N, d)."""
    total = (F.cosine_similarity(p1, z2.detach(), dim=1).sum()
             + F.cosine_similarity(p2, z1.detach(), dim=1).sum())
    return summed_over_processes(-total / (2 * p1.shape[0] * world_size()))


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
class NonFiniteLoss(Exception):
    """A loss became NaN or infinite: the run stops before that step changes any weight."""


def ssl_forward(net, x1, x2, temperature, amp=False):
    """One network on its two views: (its SSL loss, the two (N, d) matrices that its KL term
    compares). SimCLR: NT-Xent, and the projections of both views. SimSiam: its own loss, and the
    prediction of view 1 against the projection of view 2, the pair that SimSiam itself aligns.
    net: an SSLNet, as it is or wrapped by DDP or torch.compile. amp: bfloat16 autocast."""
    x = torch.cat([x1, x2])
    if x.is_cuda:  # the networks are stored channels-last on GPUs, the faster layout for cuDNN
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        z, p = net(x)
    # The losses stay in float32: softmax over 2N logits at t = 0.1 needs more than bf16's 8 bits.
    z1, z2 = z.float().chunk(2)                                         # (B, d) each
    if p is None:
        return nt_xent(z1, z2, temperature), (z1, z2)
    p1, p2 = p.float().chunk(2)
    return simsiam_loss(p1, p2, z1, z2), (p1, z2)


def train_step(student, peer, optimizers, views, cfg):
    """One DoGo step on views (B, 4, C, H, W): views 0-1 go to the student, 2-3 to the peer.
    With peer=None it is a plain SSL step on views 0-1. Returns the loss terms as floats.
    Under torchrun, views are this process's share of the batch and the networks DDP-wrapped."""
    amp = views.is_cuda if cfg.amp is None else cfg.amp
    ssl, (s1, s2) = ssl_forward(student, views[:, 0], views[:, 1], cfg.temperature, amp)
    terms = {"ssl": ssl}
    loss = ssl
    if peer is not None:
        ssl_peer, (q1, q2) = ssl_forward(peer, views[:, 2], views[:, 3], cfg.temperature, amp)
        terms["kl"] = dogo_kl(s1, s2, q1, q2, cfg.kd_temperature)       # student learns from peer
        terms["ssl_peer"] = ssl_peer
        terms["kl_peer"] = dogo_kl(q1, q2, s1, s2, cfg.kd_temperature)  # peer learns from student
        loss = (loss + cfg.kd_weight * terms["kl"]
                + terms["ssl_peer"] + cfg.peer_kd_weight * terms["kl_peer"])
    if not torch.isfinite(loss):
        raise NonFiniteLoss(", ".join(f"{k} {v.item():.4g}" for k, v in terms.items()))
    # dogo_kl detaches its target, so each network's loss depends on its own weights only: one
    # backward of the sum gives every network exactly the gradient of its own loss.
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    # Under torchrun each process's backward already gives the global batch's gradient for its
    # own images; the weights' gradient is the sum over processes, and DDP averages: so * world.
    (loss * world_size()).backward()
    for opt in optimizers:
        opt.step()
    return {k: v.item() for k, v in terms.items()}


def seed_of(cfg, rank, step):
    """A seed of its own for each process and each start of a run (a resumed run draws anew)."""
    return int(np.random.SeedSequence([cfg.seed, rank, step]).generate_state(1)[0])


def make_loader(data, cfg, device, rank=0, world=1, step=0):
    """Batches of this process's share of --batch-size; call loader.sampler.start(epoch, skip)
    before each epoch. Its worker processes live for the whole run (persistent_workers): no start-up
    cost per epoch. step: where the run starts, so that a resumed run draws new augmentations."""
    order = EpochOrder(data, cfg.seed * 100003, rank, world)
    return DataLoader(data, batch_size=cfg.batch_size // world, sampler=order,
                      drop_last=True,  # every step has the same number of negatives
                      num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                      pin_memory=device.type == "cuda",  # page-locked: copies to the GPU overlap compute
                      generator=torch.Generator().manual_seed(seed_of(cfg, rank, step)),
                      worker_init_fn=ignore_ctrl_c)


def save_checkpoint(path, cfg, step, student, peer, optimizers, epoch=0):
    """Atomically (temporary file, then rename): a crash never leaves a half-written checkpoint.
    Only tensors and plain Python values, so that it loads with torch.load(weights_only=True)."""
    state = {
        "config": dataclasses.asdict(cfg), "step": step, "epoch": epoch,  # epochs completed
        "student": student.state_dict(), "student_opt": optimizers[0].state_dict(),
        "peer": peer.state_dict() if peer else None,
        "peer_opt": optimizers[1].state_dict() if peer else None,
        "rng_cpu": torch.get_rng_state(),  # the augmentations draw from it
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


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


def resolve_config(cfg, given=frozenset()):
    """Check cfg and fill in what depends on other flags. With --resume, the checkpoint's config
    with the flags given now applied, except that those which define the networks and the data
    must agree with it. Returns (config, checkpoint or None)."""
    check_flags(cfg)
    cfg = dataclasses.replace(cfg, img_size=cfg.img_size or DATASETS[cfg.dataset].img_size)
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
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


def restore(ckpt, networks, optimizers, cfg, device):
    """Load networks, optimiser states and RNG state from a checkpoint; returns its step."""
    if (ckpt["peer"] is None) != (len(networks) == 1):
        raise UsageError(f"--resume {cfg.resume}: its peer does not match --peer {cfg.peer}")
    for net, opt, name in zip(networks, optimizers, ("student", "peer")):
        net.load_state_dict(ckpt[name])
        opt.load_state_dict(ckpt[name + "_opt"])
        for group in opt.param_groups:  # a --lr given now wins over the saved one
            group["lr"] = cfg.lr
    torch.set_rng_state(ckpt["rng_cpu"])
    if device.type == "cuda" and ckpt["rng_cuda"]:
        torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
    return ckpt["step"]


def build_training(cfg, device, world, ckpt=None):
    """(student, peer, optimisers, step to start from, runners). The runners are what train_step
    calls: the same networks, wrapped by DDP under torchrun and compiled with --compile."""
    student, peer = build_networks(cfg)
    if cfg.sync_bn and world > 1:  # else each process normalises over its own batch_size / world images
        student, peer = (n and nn.SyncBatchNorm.convert_sync_batchnorm(n) for n in (student, peer))
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    networks = [n.to(device, memory_format=layout) for n in (student, peer) if n is not None]
    optimizers = build_optimizers(networks, cfg)
    step = restore(ckpt, networks, optimizers, cfg, device) if ckpt else 0
    runners = []
    for net in networks:
        if world > 1:  # DDP averages the gradients over the processes during the backward pass
            net = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
        runners.append(torch.compile(net) if cfg.compile else net)
    return student, peer, optimizers, step, (runners + [None])[:2]


def benchmark(cfg, rank, world, device, warmup=3):
    """--benchmark: where the time of a training step goes, measured on synthetic images. Prints
    (process 0) `benchmark: {json}` with images_per_s (images, not views, of the global batch),
    step_ms (a whole step: the loader's batch, both networks, all loss terms, both updates),
    model_only_ms (the same step on views made beforehand), loss_ms (the NT-Xent and KL terms of
    both networks, forward and backward, on fixed projections), data_ms (making one step's views
    in one process, work that the loader spreads over its workers), peak_mem_mb (of the GPU; on
    CPU the process's peak resident memory) and device. --max-steps sets the timed steps (5)."""
    steps = cfg.max_steps or 5
    data = ssl_views(SyntheticShapes(cfg.batch_size * (warmup + steps), cfg.img_size), cfg)
    _, peer, optimizers, _, (run_student, run_peer) = build_training(cfg, device, world)
    loader = make_loader(data, cfg, device, rank, world)
    loader.sampler.start(0)
    local = cfg.batch_size // world
    ms_per_call = lambda fn: time_calls(fn, calls=steps, warmup=warmup, device=device)
    batches = iter(loader)
    step_ms = ms_per_call(lambda: train_step(run_student, run_peer, optimizers,
                                             ready_views(next(batches)[0], cfg, device), cfg))
    make_views = lambda: ready_views(torch.stack([data[i][0] for i in range(local)]), cfg, device)
    data_ms = ms_per_call(make_views)
    views = make_views()
    model_only_ms = ms_per_call(lambda: train_step(run_student, run_peer, optimizers, views, cfg))
    z = [torch.randn(local, cfg.proj_dim, device=device, requires_grad=True) for _ in range(4)]

    def losses():  # train_step's four terms (two with --peer none), as if both peers used SimCLR
        loss = nt_xent(z[0], z[1], cfg.temperature)
        if peer is not None:
            loss = (loss + cfg.kd_weight * dogo_kl(*z, cfg.kd_temperature) + nt_xent(z[2], z[3], cfg.temperature)
                    + cfg.peer_kd_weight * dogo_kl(z[2], z[3], z[0], z[1], cfg.kd_temperature))
        loss.backward()
    loss_ms = ms_per_call(losses)
    result = dict(images_per_s=cfg.batch_size / step_ms * 1000, step_ms=step_ms, model_only_ms=model_only_ms,
                  loss_ms=loss_ms, data_ms=data_ms, peak_mem_mb=peak_memory_mb(device))
    result = {k: round(v, 2) for k, v in result.items()}
    result["device"] = f"{world} x {device.type}" if world > 1 else str(device)
    if rank == 0:
        print(f"{cfg.arch} + peer {cfg.peer}, batch {cfg.batch_size} at {cfg.img_size} px: {warmup} warm-up "
              f"and {steps} timed calls of each part\nbenchmark: {json.dumps(result)}", flush=True)
    return result


def train(cfg, given=frozenset()):
    """Train cfg.arch with its peer (or alone, with --peer none); returns (student, peer).
    `given`: the names of the flags set on the command line, which override a resumed config.
    Under torchrun every process runs this; only process 0 prints and writes files."""
    cfg, ckpt = resolve_config(cfg, given)
    rank, world, device = init_distributed(cfg)
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: cuDNN times its kernels once
    if cfg.benchmark:
        return benchmark(cfg, rank, world, device)
    base = load_dataset(cfg.dataset, cfg.data_dir, "ssl", cfg.synthetic_size, cfg.img_size)
    data = ssl_views(base, cfg)
    steps_per_epoch = len(data) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {len(data)} training "
                         f"images; use a smaller batch")
    total_steps = cfg.epochs * steps_per_epoch
    total_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    student, peer, optimizers, step, (run_student, run_peer) = build_training(cfg, device, world, ckpt)
    if rank:  # other augmentations in each process (the weights stay in step through DDP)
        torch.manual_seed(seed_of(cfg, rank, step))
    loader = make_loader(data, cfg, device, rank, world, step)
    os.makedirs(cfg.out_dir, exist_ok=True)
    paths = {k: os.path.join(cfg.out_dir, k) for k in ("checkpoint.pt", "metrics.csv", "losses.png")}
    say = print if rank == 0 else lambda *args, **kwargs: None
    if ckpt is None and os.path.exists(paths["checkpoint.pt"]):
        say(f"note: {cfg.out_dir} holds an earlier run, which this one replaces "
            f"(to continue it instead: --resume {paths['checkpoint.pt']})")
    rows = read_metrics(paths["metrics.csv"], step)
    pair = cfg.arch if cfg.peer == "none" else f"{cfg.arch} + peer {cfg.peer}"
    where = f"{world} processes on {device.type}" if world > 1 else f"device {device}"
    say(f"DoGo: {pair} on {cfg.dataset} ({len(data)} images, {cfg.img_size} px), batch "
        f"{cfg.batch_size}, {steps_per_epoch} steps/epoch, steps {step} -> {total_steps}, "
        f"{where}, out-dir {cfg.out_dir}", flush=True)
    if step >= total_steps:
        say(f"nothing to do: the checkpoint is at step {step}; raise --epochs or --max-steps")
        return student, peer

    progress = Progress(paths["metrics.csv"], rows, cfg.batch_size, total_steps, cfg.epochs)
    stop = False
    with StopOnCtrlC(quiet=rank > 0) as ctrl_c:
        while step < total_steps and not stop:
            epoch = step // steps_per_epoch
            loader.sampler.start(epoch, skip=step % steps_per_epoch * (cfg.batch_size // world))
            for batch, _ in loader:
                try:
                    views = ready_views(batch, cfg, device)
                    progress.add(train_step(run_student, run_peer, optimizers, views, cfg))
                except NonFiniteLoss as err:  # the checkpoint on disk is the last good state
                    raise NonFiniteLoss(f"loss is not finite at step {step + 1} ({err}); stopped before "
                                        f"updating the weights or the checkpoint; try a lower --lr") from None
                step += 1
                stop = any_process(ctrl_c.requested, device)
                if rank == 0 and (step % cfg.log_every == 0 or step == total_steps or stop):
                    progress.log(epoch + 1, step)
                if step == total_steps or stop:
                    break
            if rank == 0:  # end of an epoch, of the run, or Ctrl-C
                save_checkpoint(paths["checkpoint.pt"], cfg, step, student, peer, optimizers,
                                epoch=step // steps_per_epoch)
                plot_losses(progress.rows, paths["losses.png"])
    if stop:
        say(f"interrupted at step {step}: saved {paths['checkpoint.pt']}; continue with "
            f"python dogo.py --resume {paths['checkpoint.pt']}")
        raise KeyboardInterrupt
    say(f"done: {paths['checkpoint.pt']}, {paths['metrics.csv']}, {paths['losses.png']}")
    return student, peer


def main(argv=None):
    try:
        cfg, given = parse_flags(Config, argv)
        train(cfg, given)
    except (UsageError, NonFiniteLoss) as err:
        if int(os.environ.get("RANK", 0)):  # torchrun stops all processes when the first one
            time.sleep(5)                   # ends: let process 0 say it, once, when all agree
        print(f"dogo.py: error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, UsageError) else 1)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
