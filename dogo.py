"""Distill on the Go (DoGo): online knowledge distillation for self-supervised learning.

Bhat, Arani, Zonooz. "Distill on the Go: Online knowledge distillation in self-supervised learning",
CVPR 2021 workshop on Learning from Limited and Imperfect Data, arXiv:2104.09866.

Two networks learn from scratch at the same time, without labels: the student (--arch), the small network
DoGo is for, and its peer (--peer). Each solves SimCLR (or SimSiam) on its own two views of every image, and
learns to agree with the other on how similar the images of a batch are (mutual learning on similarities):

    L_k = SSL_k  +  lambda_k * KL( P_other || P_k )      (P: row-softmax of cross-view cosines)

examples:
  python dogo.py --arch resnet18 --peer resnet50      # the paper's set-up: CIFAR-10, a GPU job
  python dogo.py --arch resnet18 --peer none          # the baseline: the student alone
  python dogo.py --dataset synthetic --arch wrn10_2 --peer wrn10_2 --img-size 16 --synthetic-size 1024 \\
      --batch-size 32 --lr 1e-3 --epochs 2 --out-dir runs/demo        # offline, on a CPU: the README's demo
  python dogo.py --resume runs/cifar10_resnet18_resnet50/checkpoint.pt --epochs 400
  python dogo.py --resume auto ...                    # the same command each time a cluster requeues the job
  torchrun --standalone --nproc_per_node=8 dogo.py --batch-size 256   # 8 GPUs, 32 images each

outputs in --out-dir: checkpoint.pt, metrics.csv, losses.png; evaluate with eval_linear.py
"""
import argparse, contextlib, csv, dataclasses, fcntl, functools, hashlib, io, math, multiprocessing, os, signal
import sys, time
from collections import namedtuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.transforms import v2

# ---- Config ------------------------------------------------------------------------------------
ARCHS = ("resnet18", "resnet34", "resnet50", "wrn10_2", "wrn16_2", "wrn16_4", "wrn16_8", "wrn28_2",
         "mobilenetv2", "shufflenetv2")
OBJECTIVES = ("simclr", "simsiam")
# A resume keeps these (they define the networks, the data, and what a step and an epoch's position mean)...
FIXED_ON_RESUME = ("arch", "peer", "objective", "peer_objective", "dataset", "img_size", "proj_dim", "batch_size",
                   "synthetic_size")
MACHINE = ("device", "workers", "amp", "batch_augment", "sync_bn", "compile")  # ...and resolves these at each start
OUTPUTS = ("checkpoint.pt", "metrics.csv", "losses.png")  # what a run writes in --out-dir (and run.lock)
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
    peer_objective: str = flag("same", "the peer's task; same = the student's", OBJECTIVES + ("same",))
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
    seed: int = flag(0, "seed for initialisation, data order and augmentations (0 to 2**32 - 1)")
    out_dir: str = flag("", "where outputs go; '' = runs/DATASET_ARCH_PEER, or the --resume checkpoint's folder")
    resume: str = flag("", "checkpoint.pt to continue, or auto: --out-dir's if it has one, else a new run")
    log_every: int = flag(50, "steps between progress lines and rows of metrics.csv")
    knn_every: int = flag(1, "epochs between kNN top-1 figures of both networks (and at step 0); 0 = off")
    knn_images: int = flag(2000, "kNN monitor: labelled training images in its bank, and test images scored")
    amp: bool = flag(None, "bfloat16 autocast for the networks, not the losses; default: on GPUs with native bfloat16")
    compile: bool = flag(False, "torch.compile the networks: a slow first step, faster later ones")
    sync_bn: bool = flag(None, "under torchrun, BatchNorm over the global batch; default: on with GPUs, which it needs")
    batch_augment: bool = flag(True, "crop each image in the loader, then colour all views of a batch in one call "
                               "on the training device (faster on GPUs and CPUs); off: all per image in the loader")

def require(cfg, name, ok, what):
    """Refuse cfg.name unless ok(value), naming its flag and what it takes (a value of another type fails too)."""
    with contextlib.suppress(TypeError):
        if ok(getattr(cfg, name)):
            return
    raise UsageError(f"--{name.replace('_', '-')} must be {what}, got {getattr(cfg, name)}")

def check_config(cfg):
    """Refuse the values that cannot work, from the command line or a checkpoint; nan and inf fail every check."""
    for f in filter(lambda f: f.metadata["choices"], dataclasses.fields(cfg)):  # argparse checks the command line's
        require(cfg, f.name, lambda v: v in f.metadata["choices"], "one of " + ", ".join(f.metadata["choices"]))
    for name in ("lr", "temperature", "kd_temperature"):  # float32 weights: larger values overflow
        require(cfg, name, lambda v: 0 < v <= torch.finfo(torch.float32).max, "a positive float32 number")
    for name in ("weight_decay", "kd_weight", "peer_kd_weight", "img_size", "max_steps", "knn_every"):
        require(cfg, name, lambda v: 0 <= v < math.inf, "0 or more")
    for name in ("epochs", "proj_dim", "log_every", "knn_images"):
        require(cfg, name, lambda v: v >= 1, "at least 1")
    require(cfg, "batch_size", lambda v: v >= 2, "at least 2 (NT-Xent needs a negative)")
    require(cfg, "synthetic_size", lambda v: v >= 10, "at least 10")
    require(cfg, "workers", lambda v: v is None or v >= 0, "0 or more")
    require(cfg, "seed", lambda v: 0 <= v < 2 ** 32, "from 0 to 4294967295")  # NumPy's seeds
    return cfg

# ---- Data and augmentations --------------------------------------------------------------------
def load_dataset(name, data_dir, split, synthetic_size=2000, img_size=32):
    """The raw (image, label) dataset of a split: 'ssl' (STL-10: its unlabeled split alone), 'train' or 'test'."""
    train = split != "test"
    try:
        if name == "synthetic":  # made in memory: see the plumbing at the end of this file
            return SyntheticShapes(synthetic_size if train else max(synthetic_size // 4, 10), img_size, train=train)
        if name in ("cifar10", "cifar100"):
            return getattr(torchvision.datasets, name.upper())(data_dir, train=train, download=True)
        if name == "stl10":
            stl_split = {"ssl": "unlabeled", "train": "train", "test": "test"}[split]
            return torchvision.datasets.STL10(data_dir, split=stl_split, download=True)
        folders = [os.path.join(data_dir, f) for f in (["train"] if train else ["test", "val"])]
        return ImageFolder(next(filter(os.path.isdir, folders), folders[0]))
    except Exception as err:  # offline, missing, corrupt, empty: all end the same way for the user
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"cannot load {name} ({split} split) from --data-dir {data_dir}: {reason}; "
                         f"put the data there, or run offline with --dataset synthetic") from None

CROP_SCALE, JITTER, P_JITTER = (0.08, 1.0), (0.8, 0.8, 0.8, 0.2), 0.8  # SimCLR's ImageNet jitter (strength 1,
P_GRAY, P_BLUR, BLUR_SIGMA = 0.2, 0.5, (0.1, 2.0)  # Chen et al. 2020, App. A; CIFAR: 0.5), the authors' at all sizes

def blur_kernel_size(img_size):
    """Odd, ~10% of the image (23 at 224 px); 0 at any other size: the authors blur at exactly 224 px only."""
    return int(0.1 * img_size) // 2 * 2 + 1 if img_size == 224 else 0

def crop_flip(img_size):
    """SimCLR's crop of one image, from its whole extent, and flip: any image -> uint8 (3, img_size, img_size)."""
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(img_size, scale=CROP_SCALE, antialias=True),
                       v2.RandomHorizontalFlip()])

def ssl_augmentation(img_size, dataset):
    """SimCLR's whole augmentation of one image, ending in a normalised float tensor."""
    info, kernel = DATASETS[dataset], blur_kernel_size(img_size)
    blur = [v2.RandomApply([v2.GaussianBlur(kernel, sigma=BLUR_SIGMA)], p=P_BLUR)] if kernel else []
    return v2.Compose([crop_flip(img_size), v2.RandomApply([v2.ColorJitter(*JITTER)], p=P_JITTER),
                       v2.RandomGrayscale(p=P_GRAY), *blur, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(info.mean, info.std)])

def resize_crop(img_size):
    """No augmentation: resize and centre-crop any image to uint8 (3, img_size, img_size)."""
    return v2.Compose([v2.ToImage(), v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size)])

class Transformed(Dataset):
    """The (image, label) items of base through transform; with k, k independent draws stacked (k, C, H, W)."""
    def __init__(self, base, transform, k=None):
        self.base, self.transform, self.k = base, transform, k
    def __len__(self):
        return len(self.base)
    def __getitem__(self, i):
        img, label = self.base[i]
        views = self.transform(img) if self.k is None else torch.stack([self.transform(img) for _ in range(self.k)])
        return views, label

def training_set(base, cfg):
    """The loader's items: 4 views of an image, a pair per network so that neither matches its peer by seeing the same
    pixels (Figure 1); 2 without a peer. --batch-augment: uint8 crops, for to_views to colour."""
    k = 2 if cfg.peer == "none" else 4
    return Transformed(base, crop_flip(cfg.img_size) if cfg.batch_augment else
                       ssl_augmentation(cfg.img_size, cfg.dataset), k)

def to_views(batch, cfg, device):
    """A batch from the loader (B, k, C, H, W) -> its normalised views on the device, all coloured in one call."""
    batch = batch.to(device, non_blocking=True)  # from pinned memory: the copy overlaps compute
    if not cfg.batch_augment:
        return batch
    info = DATASETS[cfg.dataset]
    return batch_ssl_augmentation(batch.flatten(0, 1), cfg.img_size, info.mean, info.std).unflatten(0, batch.shape[:2])

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
    def forward(self, x):  # x: (B, 3, H, W); one call for the whole pass, which is what DDP and compile wrap
        z = self.head(self.encoder(x))  # (B, proj_dim)
        return z, (None if self.predictor is None else self.predictor(z))

def peer_objective(cfg):
    return cfg.objective if cfg.peer_objective == "same" else cfg.peer_objective

def build_networks(cfg, device=torch.device("cpu")):
    """[student, peer or None] as cfg describes them, on the device, from cfg.seed: the same in every process."""
    torch.manual_seed(cfg.seed)
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format  # cuDNN's faster one
    student = SSLNet(cfg.arch, cfg.img_size, cfg.proj_dim, cfg.objective)
    peer = None if cfg.peer == "none" else SSLNet(cfg.peer, cfg.img_size, cfg.proj_dim, peer_objective(cfg))
    return [net and net.to(device, memory_format=layout) for net in (student, peer)]

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
def ssl_loss(net, x1, x2, temperature, amp=False):
    """One network on its two views (N, C, H, W) -> (its SSL loss, its similarity pair, its projections z1, z2): the
    pair is what its KL term compares, the projections for SimCLR, the predictions p1, p2 for SimSiam. amp: bf16."""
    x = torch.cat([x1, x2])
    if x.is_cuda:  # the networks are stored channels-last on GPUs, the faster layout for cuDNN
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        z, p = net(x)
    # The losses stay in float32: softmax over 2N logits at t = 0.1 needs more than bf16's 8 bits. Under
    # torchrun, gather makes every loss that of the global batch: every anchor meets all 2N - 2 negatives.
    z1, z2 = (gather(t) for t in z.float().chunk(2))                    # (N, d) each
    if p is None:
        return nt_xent(z1, z2, temperature), (z1, z2), (z1, z2)
    p1, p2 = (gather(t) for t in p.float().chunk(2))
    return simsiam_loss(p1, p2, z1, z2), (p1, p2), (z1, z2)

def kl_target(receiver_objective, pair, projections):
    """What a network offers its peer's KL term: its similarity pair; to a SimSiam network, its projections, which
    that network's predictions are compared with (the authors' pairing)."""
    return projections if receiver_objective == "simsiam" else pair

def train_step(student, peer, optimizers, views, cfg):
    """One DoGo step on views (B, 4 or 2, C, H, W): 0-1 the student's, 2-3 the peer's -> its loss terms as device
    tensors: reading a value would make the host wait for the device, so the loop reads them once an interval."""
    amp = views.is_cuda if cfg.amp is None else cfg.amp
    ssl, pair, z = ssl_loss(student, views[:, 0], views[:, 1], cfg.temperature, amp)
    terms, loss = {"ssl": ssl}, ssl
    if peer is not None:
        ssl_peer, pair_peer, z_peer = ssl_loss(peer, views[:, 2], views[:, 3], cfg.temperature, amp)
        # KL(Q || P) for the student, KL(P || Q) for the peer: each pulled towards what the other offers
        terms["kl"] = dogo_kl(*pair, *kl_target(cfg.objective, pair_peer, z_peer), cfg.kd_temperature)
        terms["ssl_peer"] = ssl_peer
        terms["kl_peer"] = dogo_kl(*pair_peer, *kl_target(peer_objective(cfg), pair, z), cfg.kd_temperature)
        loss = loss + cfg.kd_weight * terms["kl"] + ssl_peer + cfg.peer_kd_weight * terms["kl_peer"]
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()  # dogo_kl detaches its target: each network gets exactly the gradient of its own loss
    for opt in optimizers:
        opt.step()
    return {k: v.detach() for k, v in terms.items()}

# ---- The training loop -------------------------------------------------------------------------
def train(cfg, saved=None, rank=0, world=1, device=torch.device("cpu")):
    """Train anew or on from `saved` -> the stop signal's number, or 0 when done; only process 0 prints and writes."""
    data = training_set(load_dataset(cfg.dataset, cfg.data_dir, "ssl", cfg.synthetic_size, cfg.img_size), cfg)
    steps_per_epoch = len(data) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {cfg.batch_size} exceeds the {len(data)} training images; use a smaller one")
    student, peer, optimizers, step = restore(saved, cfg, device)
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)
    say = print if rank == 0 else lambda *args, **kwargs: None
    say(f"DoGo: {describe(cfg)} on {cfg.dataset} ({len(data)} images, {cfg.img_size} px), batch {cfg.batch_size}, "
        f"{steps_per_epoch} steps/epoch, steps {step} -> {total_steps}, "
        f"{f'{world} processes on {device.type}' if world > 1 else f'device {device}'}, out-dir {cfg.out_dir}")
    if step >= total_steps:
        say(f"nothing to do: the checkpoint is at step {step}; raise --epochs or --max-steps")
        return 0
    # The kNN monitor reads the test split before anything is written; a run shorter than an epoch (a smoke test)
    # goes without it, which would take most of its time.
    monitor = knn_monitor(cfg, device) if rank == 0 and total_steps >= steps_per_epoch else None
    lock = claim_out_dir(cfg) if rank == 0 else None  # held until the process ends
    run_student, run_peer = (runner(net, cfg, device, world) for net in (student, peer))
    loader = make_loader(data, cfg, device, rank, world, step)
    log, signals = Progress(cfg, step, total_steps, steps_per_epoch, device, rank), StopSignals(quiet=rank > 0)
    if monitor and step == 0:  # the untrained networks: the floor that learning must beat
        log.record(0, monitor([student, peer]))
    with signals:
        while step < total_steps and not signals.agreed:
            loader.sampler.start(step // steps_per_epoch, skip=step % steps_per_epoch * cfg.batch_size // world)
            for batch, _ in log.timed(loader):
                log.interval.append(train_step(run_student, run_peer, optimizers, to_views(batch, cfg, device), cfg))
                step += 1
                epoch_ends = step % steps_per_epoch == 0 or step == total_steps
                # A single process stops after this step; several agree at an interval, where they already wait
                # for each other. An interval also ends at this start's first step, its time holding the warm-up.
                if epoch_ends or step % cfg.log_every == 0 or step == log.first + 1 or world == 1 and signals.signum:
                    signals.agreed = log.write(step, signals.signum)  # the interval's one read of device values
                if epoch_ends or signals.agreed:
                    break
            if rank == 0:  # the end of an epoch or of the run, or a stop request: save
                with log.paused():  # saves and the kNN monitor count in neither the speed nor the data wait
                    if monitor and not signals.agreed and (step == total_steps or
                                                           step % (cfg.knn_every * steps_per_epoch) == 0):
                        log.record(step, monitor([student, peer]))
                    save_checkpoint(cfg, step, student, peer, optimizers, device)
                    plot_losses(log.rows, cfg)
    ckpt = os.path.join(cfg.out_dir, OUTPUTS[0])
    if signals.agreed:
        say(f"stopped by {signal.Signals(signals.agreed).name} at step {step}: saved {ckpt}; continue with "
            f"python dogo.py --resume {ckpt}")
        return signals.agreed
    speed = f"{log.speed():.1f} img/s after the first step" if log.speed() else "too short for a speed"
    say(f"done: {ckpt}, {os.path.join(cfg.out_dir, OUTPUTS[1])}, {os.path.join(cfg.out_dir, OUTPUTS[2])}; {speed}")
    return 0

def main(argv=None):
    """The command line. Errors the user can fix: one line, exit 2; a stop by a signal: exit 128 + its number. Under
    torchrun only process 0 speaks: the others see the same flags and data, or lose it and stop quietly."""
    cfg, code, rank = None, 0, int(os.environ.get("RANK", "0") or 0)
    previous = {s: signal.signal(s, stop_at_once) for s in STOP_SIGNALS[1:]}  # before the loop: stop at once
    try:
        cfg, given = parse_flags(Config, argv, "dogo.py", __doc__)
        device = pick_device(cfg.device)
        cfg, saved = resolve_config(cfg, given, device)
        world = init_distributed(cfg, device)
        cfg = resolve_machine(cfg, device, world)
        torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed sizes: cuDNN picks its kernels once
        code = train(cfg, saved, rank, world, device)
        code = code and 128 + code
    except (UsageError, NonFiniteLoss, OSError) as err:  # OSError: a file that failed mid-run (an image, the disk)
        code, mid_run = (1, True) if isinstance(err, NonFiniteLoss) else (2, isinstance(err, OSError))
        if rank == 0:
            print(f"dogo.py: error: {last_line(err)}{kept_checkpoint(cfg) if mid_run else ''}", file=sys.stderr)
        with contextlib.suppress(KeyboardInterrupt):  # the others end later: torchrun stops all when one ends,
            time.sleep(2 if rank else 0)              # and process 0 is the one to say why
    except KeyboardInterrupt as err:  # a second Ctrl-C in the loop, or a stop signal before it
        signum = err.args[0] if err.args else signal.SIGINT  # Python's own Ctrl-C has no number
        code = 128 + signum
        if rank == 0:
            print(f"dogo.py: stopped by {signal.Signals(signum).name} without saving{kept_checkpoint(cfg)}",
                  file=sys.stderr)
    except RuntimeError:
        if not (rank and dist.is_initialized()):
            raise
        code = 2  # process 0 ended (its error is its to say) and the process group with it
    finally:
        end_processes(previous)
    if code:
        sys.exit(code)

# ==== Plumbing: how the script runs, not what it computes =======================================
# ---- Flags and errors --------------------------------------------------------------------------
class UsageError(Exception):
    """A problem the user can fix (a flag, a path, missing data): reported as one line, exit 2."""

class NonFiniteLoss(Exception):
    """A loss became NaN or infinite: the run stops without saving the weights since the last save."""

def parse_flags(config_class, argv=None, prog="dogo.py", doc=""):
    """(config, names of the flags given): a flag per field, its help and choices; --help ends with doc's examples."""
    class FlagParser(argparse.ArgumentParser):
        def error(self, message):  # one line naming the problem, instead of the usage and exit
            raise UsageError(f"{message} (see python {self.prog} --help)")
    # SUPPRESS: flags not given stay out of the namespace, so that --resume can tell them apart.
    parser = FlagParser(prog=prog, description=doc.splitlines()[0], argument_default=argparse.SUPPRESS,
                        epilog=doc[doc.find("examples:"):], formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(config_class):  # a bool gives --amp and --no-amp; a None default, what its help says
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type,
                                                                                        choices=f.metadata["choices"])
        parser.add_argument("--" + f.name.replace("_", "-"), **kind, help=f.metadata["help"] +
                            ("" if f.default is None else f" (default: {f.default})"))
    given = vars(parser.parse_args(argv))
    return config_class(**given), set(given)

def last_line(err):
    """The line of an error to show: a loader worker's error arrives as its whole traceback, ending in its own."""
    line = (str(err).strip() or type(err).__name__).splitlines()[-1]
    return line.split(": ", 1)[-1] if str(err).startswith("Caught ") else line

# ---- Checkpoints: written whole or not at all; loaded through the networks they fit -------------
@contextlib.contextmanager
def atomic_file(path):
    """A binary file that replaces `path` once whole; a failed write keeps the previous file and ends in one line."""
    try:
        with open(path + ".tmp", "wb") as f:
            yield f
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as err:  # torch says RuntimeError for a full disk, and less than the OS
        reason = getattr(err, "strerror", None) or "the write failed: is the disk full?"
        raise UsageError(f"cannot save {path} ({reason}); the previous one is left as it was: free some space, "
                         f"or give another folder") from None
    finally:  # after an error or a second Ctrl-C too: no temporary file is left
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")

def ran_on(device):
    """What a checkpoint or a result line records of the machine."""
    return dict(torch=str(torch.__version__), torchvision=torchvision.__version__,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")

def save_checkpoint(cfg, step, student, peer, optimizers, device):
    """Tensors and plain values only, for weights_only loading; the config is the one that ran."""
    state = dict(config=dataclasses.asdict(cfg), step=step, ran_on=ran_on(device),
                 student=student.state_dict(), student_opt=optimizers[0].state_dict(),
                 peer=peer and peer.state_dict(), peer_opt=peer and optimizers[1].state_dict(),
                 rng_cpu=torch.get_rng_state(),  # the augmentations draw from it; on a GPU, from this GPU's alone
                 rng_cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    with atomic_file(os.path.join(cfg.out_dir, OUTPUTS[0])) as f:
        torch.save(state, f)

Saved = namedtuple("Saved", "cfg step student peer optimizers rng_cpu rng_cuda sha256")

def load_checkpoint(path, flag="--resume", device=torch.device("cpu")):
    """A checkpoint read once, running no code that it may hold, and loaded strictly into the networks and Adam
    optimisers that its config builds -> Saved; whatever does not fit is one line. sha256: of the bytes read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # Adam's step counts stay there
        values = {k: v for k, v in ckpt["config"].items() if k in Config.__dataclass_fields__}  # older flags: dropped
        cfg = check_config(Config(**{**values, "peer_objective": values.get("peer_objective") or "same"}))  # was ''
        networks = build_networks(cfg, device)
        optimizers = build_optimizers(networks, cfg)
        if (networks[1] is None) != (ckpt["peer"] is None):
            raise ValueError(f"its peer weights do not fit its --peer {cfg.peer}")
        for name, net, opt in zip(("student", "peer"), networks, optimizers):
            net.load_state_dict(ckpt[name])
            opt.load_state_dict(ckpt[name + "_opt"])  # Adam checks the groups, not the shapes of its moments:
            if any(s[k].shape != p.shape for p, s in opt.state.items() for k in ("exp_avg", "exp_avg_sq")):
                raise ValueError(f"its {name} optimiser state does not fit the {name}")
        if type(ckpt["step"]) is not int or ckpt["step"] < 0 or not isinstance(ckpt["rng_cpu"], torch.Tensor):
            raise ValueError(f"its step ({ckpt['step']!r}) or random state is not one that dogo.py writes")
    except Exception as err:  # unreadable, not a checkpoint, code in it, a key, shape, type or value that does not fit
        reason = {OSError: f"cannot be read ({getattr(err, 'strerror', '')})", KeyError: f"it has no {err}",
                  UsageError: f"its config: {err}"}.get(type(err), f"{type(err).__name__}: {err}")
        raise UsageError(f"{flag} {path}: {' '.join(reason.split())[:300]}; give a checkpoint.pt that dogo.py "
                         f"wrote") from None
    rng_cuda = ckpt.get("rng_cuda")  # earlier versions saved a list, every GPU's ([] on a CPU); the saver's first
    rng_cuda = (rng_cuda or [None])[0] if isinstance(rng_cuda, list) else rng_cuda
    return Saved(cfg, ckpt["step"], *networks, optimizers, ckpt["rng_cpu"], rng_cuda, hashlib.sha256(data).hexdigest())

def resolve_config(cfg, given=frozenset(), device=torch.device("cpu")):
    """(config to run, Saved to resume or None). With --resume, `given` flags override the checkpoint's config,
    except FIXED_ON_RESUME, which must agree; MACHINE never comes from it; the out-dir is its folder by default."""
    cfg = dataclasses.replace(check_config(cfg), img_size=cfg.img_size or DATASETS[cfg.dataset].img_size)
    cfg.out_dir = cfg.out_dir or os.path.join("runs", f"{cfg.dataset}_{cfg.arch}_{cfg.peer}")
    if cfg.resume == "auto":  # the same command starts a run, then continues it each time a job is requeued
        auto = os.path.join(cfg.out_dir, OUTPUTS[0])
        cfg.resume = auto if os.path.exists(auto) else ""
    if not cfg.resume:
        return cfg, None
    saved = load_checkpoint(cfg.resume, device=device)
    for name in filter(lambda name: name in given and getattr(cfg, name) != getattr(saved.cfg, name), FIXED_ON_RESUME):
        raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)} differs from the checkpoint's "
                         f"{getattr(saved.cfg, name)}; drop the flag to resume, or start a new run without --resume")
    cfg = dataclasses.replace(saved.cfg, **{k: getattr(cfg, k) for k in {*given, *MACHINE, "resume"}
                                            if k not in FIXED_ON_RESUME})
    cfg.out_dir = cfg.out_dir if "out_dir" in given else os.path.dirname(os.path.abspath(cfg.resume))
    return cfg, saved

def restore(saved, cfg, device):
    """(student, peer, optimizers, step): new, or `saved`'s with its random state and this run's lr and weight decay."""
    if saved is None:
        networks = build_networks(cfg, device)
        return *networks, build_optimizers(networks, cfg), 0
    for group in (group for opt in saved.optimizers for group in opt.param_groups):
        group.update(lr=cfg.lr, weight_decay=cfg.weight_decay)
    torch.set_rng_state(saved.rng_cpu.cpu())
    if device.type == "cuda" and saved.rng_cuda is not None:
        torch.cuda.set_rng_state(saved.rng_cuda.cpu(), device)
    return saved.student, saved.peer, saved.optimizers, saved.step

# ---- Devices and processes (torchrun) ----------------------------------------------------------
def pick_device(name):
    """'auto': CUDA when there is a GPU, else CPU; under torchrun, 'cuda' is the process's own GPU."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    with contextlib.suppress(RuntimeError):
        device = torch.device(name)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.type == "cpu" or device.type == "cuda" and device.index < torch.cuda.device_count():
            return device
    raise UsageError(f"--device {name} is not a device of this machine ({torch.cuda.device_count()} CUDA GPU(s)); "
                     f"give auto, cpu" + (", cuda or cuda:N" if torch.cuda.is_available() else ""))

def init_distributed(cfg, device):
    """The number of processes, from torchrun's WORLD_SIZE; their group joined: NCCL on GPUs, else gloo."""
    try:
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world > 1 and cfg.batch_size % world:
            raise UsageError(f"--batch-size {cfg.batch_size} does not split evenly over {world} processes; "
                             f"give a multiple of {world} (it is the global batch, over all processes)")
        if world > 1 and cfg.sync_bn and device.type != "cuda":
            raise UsageError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on CPU; drop the flag")
        if world > 1:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    except ValueError as err:  # not a number, or a variable that torchrun sets is missing
        raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set, but {last_line(err)}; start the processes "
                         f"with torchrun, or unset WORLD_SIZE") from None
    return world

def resolve_machine(cfg, device, world):
    """cfg with MACHINE resolved for this start and machine (a GPU run resumes on a laptop), as it will be saved."""
    cuda, share = device.type == "cuda", (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    default = dict(workers=min(8, max(share, 1)), sync_bn=cuda and world > 1,
                   # bfloat16 only where the GPU computes it natively (a T4 emulates it, slower than float32)
                   amp=cuda and torch.cuda.is_bf16_supported(including_emulation=False))
    return dataclasses.replace(cfg, device=str(device),
                               **{k: v if getattr(cfg, k) is None else getattr(cfg, k) for k, v in default.items()})

def runner(net, cfg, device, world):
    """net as train_step calls it (None stays None): in DDP under torchrun; compiled in place with --compile."""
    if net is not None and world > 1:
        if cfg.sync_bn:  # BatchNorm over the global batch, in place: the optimiser keeps the same parameters
            nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    if net is not None and cfg.compile:
        net.compile()
    return net

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

def make_loader(data, cfg, device, rank=0, world=1, step=0):
    """This process's batches (loader.sampler.start(epoch, skip) before each epoch), with augmentations of its own
    for each process and each start of a run; the weights stay in step through DDP."""
    seed = int(np.random.SeedSequence([cfg.seed, rank, step]).generate_state(1)[0])
    if rank:
        torch.manual_seed(seed)
    return DataLoader(data, cfg.batch_size // world, sampler=EpochOrder(data, cfg.seed * 100003, rank, world),
                      drop_last=True,  # every step has the same number of negatives
                      num_workers=cfg.workers, persistent_workers=cfg.workers > 0,  # no start-up per epoch
                      pin_memory=device.type == "cuda",  # page-locked: copies to the GPU overlap compute
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_stop_signals)

# ---- Stop requests (Ctrl-C, a scheduler's SIGTERM, a closed terminal's SIGHUP) and the out-dir ------
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

def ignore_stop_signals(*_):  # loader workers: the main process saves and stops
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)

def stop_at_once(signum, _):  # a stop request outside the loop, where there is nothing to save
    raise KeyboardInterrupt(signum)

class StopSignals:
    """In the loop, the first stop signal asks for a save and a stop after the step. A scheduler may repeat SIGTERM
    or SIGHUP (SLURM to every task, torchrun to its workers): that changes nothing; a second Ctrl-C aborts."""
    signum = agreed = 0  # the signal received; the one that all processes agreed to stop on
    def __init__(self, quiet=False):
        self.quiet = quiet
    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self
    def _handle(self, signum, _):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt(signum)
        first, self.signum = not self.signum, self.signum or signum  # before the print, which a signal can interrupt
        if first and not self.quiet:
            print(f"\n{signal.Signals(signum).name}: saving after this step (Ctrl-C again aborts without saving)")
    def __exit__(self, *_):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

def end_processes(handlers):
    """Leave no process group, signal handler or loader worker behind (workers ignore torch's SIGTERM at exit too)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    for s, handler in handlers.items():
        signal.signal(s, handler)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would take the kills below for a crash
    for worker in multiprocessing.active_children():
        worker.kill()

def kept_checkpoint(cfg):
    """What a run that ends in an error leaves: its out-dir's checkpoint, if there is one."""
    path = cfg and cfg.out_dir and os.path.join(cfg.out_dir, OUTPUTS[0])
    return f"; {path} is kept as it was" if path and os.path.isfile(path) else "; no checkpoint was saved"

def claim_out_dir(cfg):
    """Lock --out-dir (flock: the kernel releases it when the process ends, however it ends and in whichever
    container), then refuse to write over an earlier run unless this run resumes it -> the lock, held till exit."""
    path, ckpt = cfg.out_dir, os.path.join(cfg.out_dir, OUTPUTS[0])
    try:
        os.makedirs(path, exist_ok=True)
        lock = open(os.path.join(path, "run.lock"), "a")  # kept after the run: a removal would race the next run
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        open(ckpt + ".tmp", "wb").close()  # under the lock, the longest name that a save writes: a path too long
        os.remove(ckpt + ".tmp")           # fails now, not after an epoch
    except BlockingIOError:
        raise UsageError(f"--out-dir {path} is in use by another run; wait for it to end, or give another "
                         f"--out-dir") from None
    except OSError as err:
        raise UsageError(f"--out-dir {path}: cannot write there ({err.strerror or err}); give another") from None
    earlier = [name for name in OUTPUTS if os.path.lexists(os.path.join(path, name))]
    if earlier and not (cfg.resume and os.path.isfile(ckpt) and os.path.samefile(cfg.resume, ckpt)):
        resume = "continue it with --resume auto, or " if os.path.isfile(ckpt) else ""
        raise UsageError(f"--out-dir {path} holds an earlier run's {earlier[0]}; {resume}start over in another "
                         f"--out-dir (or after deleting this one)")
    return lock

# ---- Progress: the losses, the speed and what bounds it, the kNN figures; metrics.csv and its plot
class Progress:
    """Intervals of steps: the loss terms stay on the device until one ends, then one read gives their means for a
    line and a row of metrics.csv, with images_per_s and data_wait (the share of the time spent waiting for data)."""
    def __init__(self, cfg, step, total_steps, steps_per_epoch, device, rank=0):
        self.cfg, self.first, self.total, self.per_epoch, self.device = cfg, step, total_steps, steps_per_epoch, device
        self.path, self.rank = os.path.join(cfg.out_dir, OUTPUTS[1]), rank
        self.rows = read_metrics(self.path, step) if step and rank == 0 else []
        self.interval, self.waited, self.elapsed, self.tick = [], 0.0, 0.0, time.perf_counter()
        self.steady = [0, 0.0]  # images and seconds after this start's first interval, which holds the warm-up
    def timed(self, batches):  # the batches, each one's wait added to the interval's
        tick = time.perf_counter()
        for batch in batches:
            self.waited += time.perf_counter() - tick
            yield batch
            tick = time.perf_counter()
    @contextlib.contextmanager
    def paused(self):  # what runs in the block (saves, the kNN monitor) counts in no figure
        self.elapsed += time.perf_counter() - self.tick
        yield
        self.tick = time.perf_counter()
    def write(self, step, signum=0):
        """End the interval at `step` -> the stop signal that any process received (0: none), for all to stop."""
        requested = torch.tensor([float(signum)], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(requested, op=dist.ReduceOp.MAX)
        sums = torch.stack([torch.stack(list(terms.values())) for terms in self.interval]).sum(0)
        *sums, signum = torch.cat([sums.float(), requested]).tolist()  # the interval's one read of device values
        n, elapsed = len(self.interval), self.elapsed + time.perf_counter() - self.tick
        means = {k: s / n for k, s in zip(self.interval[0], sums)}
        if not all(map(math.isfinite, means.values())):
            low = [name for name in ("temperature", "kd_temperature") if getattr(self.cfg, name) < 0.01]
            raise NonFiniteLoss(f"a loss is not finite in steps {step - n + 1}-{step} (" + ", ".join(
                f"{k} {v:.4g}" for k, v in means.items()) + "); stopped, dropping the weights since the last save; "
                + (f"raise --{low[0].replace('_', '-')}" if low else f"try a lower --lr than {self.cfg.lr}"))
        if step - n > self.first:
            self.steady = [self.steady[0] + n * self.cfg.batch_size, self.steady[1] + elapsed]
        row = {"epoch": (step - 1) // self.per_epoch + 1, "step": step, **means,
               "images_per_s": n * self.cfg.batch_size / elapsed, "data_wait": self.waited / elapsed}
        if self.device.type == "cuda":
            row["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        if self.rank == 0:
            self.rows.append(row)
            self.save()
            eta = (self.total - step) * self.cfg.batch_size / (self.speed() or row["images_per_s"])
            print(f"epoch {row['epoch']}/{self.cfg.epochs} step {step}/{self.total} | " + " ".join(
                  f"{k} {v:.4f}" for k, v in means.items()) + f" | {row['images_per_s']:.1f} img/s, "
                  f"data wait {row['data_wait']:.2f}" +
                  (f", {row['gpu_mem_gb']:.1f} GB on the GPU" if "gpu_mem_gb" in row else "") +
                  f" | eta {eta // 3600:.0f}h{eta % 3600 // 60:02.0f}m", flush=True)
        self.interval, self.waited, self.elapsed, self.tick = [], 0.0, 0.0, time.perf_counter()
        return int(signum)
    def speed(self):
        """Images/s of this start after its first interval, whose time holds the warm-up (0: too short to say)."""
        return self.steady[0] / self.steady[1] if self.steady[1] else 0.0
    def record(self, step, figures):
        """The kNN monitor's figures ({column: percent}) at `step`: on that step's row, or a row of their own."""
        if not (self.rows and int(self.rows[-1]["step"]) == step):
            self.rows.append({"epoch": (step - 1) // self.per_epoch + 1 if step else 0, "step": step})
        self.rows[-1].update(figures)
        self.save()
        print(f"kNN top-1 at step {step}: " + ", ".join(f"{'peer' if k.endswith('peer') else 'student'} {v:.2f}%"
                                                       for k, v in figures.items()), flush=True)
    def save(self):
        """metrics.csv: one header, the union of the rows' columns (a resume may add some), missing values empty."""
        columns = sorted(dict.fromkeys(k for row in self.rows for k in row), key=lambda k: "knn" in k)  # kNN last
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        with atomic_file(self.path) as f:
            f.write(text.getvalue().encode())

def read_metrics(path, step):
    """metrics.csv's rows up to `step` (not those a crash lost); an edited file is refused, never rewritten."""
    try:
        with open(path, newline="") as f:
            return [row for row in csv.DictReader(f) if int(row["step"]) <= step]
    except FileNotFoundError:
        return []
    except (OSError, KeyError, TypeError, ValueError, csv.Error) as err:
        raise UsageError(f"{path} cannot be read as dogo.py wrote it ({type(err).__name__}: {err}); restore it, "
                         f"or move it away to resume with its curves started anew") from None

LOSS_NAMES = {"simclr": "NT-Xent", "simsiam": "SimSiam loss"}

def describe(cfg):  # e.g. 'resnet18 (NT-Xent) + peer resnet50 (NT-Xent)'
    peer = f"peer {cfg.peer} ({LOSS_NAMES[peer_objective(cfg)]})" if cfg.peer != "none" else "no peer"
    return f"{cfg.arch} ({LOSS_NAMES[cfg.objective]}) + {peer}"

def plot_losses(rows, cfg):
    """losses.png: SSL terms (NT-Xent's chance: log(2N - 1)), KL terms, kNN top-1 (floor: the untrained networks')."""
    from matplotlib.figure import Figure  # no pyplot: works headless and leaves notebooks alone
    series = lambda key: [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    panels = [(title, keys) for title, keys in (("SSL loss", ("ssl", "ssl_peer")), ("KL to the peer", ("kl",
              "kl_peer")), ("kNN top-1 (%)", ("knn", "knn_peer"))) if series(keys[0])]
    if not panels:
        return
    fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    for ax, (title, keys) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for key, who, objective, colour in zip(keys, ("student", "peer"), (cfg.objective, peer_objective(cfg)), "br"):
            points = series(key)
            if points:
                ax.plot(*zip(*points), color=colour, marker="o" if len(points) < 30 else None,
                        label=f"{who} ({LOSS_NAMES[objective]})" if key.startswith("ssl") else who)
            if points and key.startswith("knn") and points[0][0] == 0:
                ax.axhline(points[0][1], color=colour, ls=":", label=f"{who} untrained")
        if title == "SSL loss" and cfg.objective == "simclr":
            ax.axhline(math.log(2 * cfg.batch_size - 1), color="gray", ls="--", label="NT-Xent at chance")
        ax.set(title=title, xlabel="step", ylabel="top-1 (%)" if title.startswith("kNN") else "loss")
        ax.legend(fontsize=8)
    with atomic_file(os.path.join(cfg.out_dir, OUTPUTS[2])) as f:
        fig.savefig(f, format="png")

# ---- kNN: one path for the monitor and eval_linear.py ---------------------------------------------
def dataset_labels(base):
    """All labels of a dataset as an int64 array, without decoding an image where it can (STL-10: .labels)."""
    labels = getattr(base, "targets", getattr(base, "labels", None))
    return np.asarray([label for _, label in base] if labels is None else labels, dtype=np.int64)

def align_classes(train, test):
    """Number an image-folder test split's classes as its training split does, by name, in place: each folder
    numbers its own sorted classes, so a class missing from one would shift every label after it."""
    if not hasattr(test, "class_to_idx"):  # CIFAR, STL-10, synthetic: one fixed list of classes
        return
    unknown, missing = sorted(set(test.classes) - set(train.classes)), sorted(set(train.classes) - set(test.classes))
    if unknown:
        raise UsageError(f"the test split has classes that the training split lacks: {', '.join(unknown)}; "
                         f"remove them from the test folder, or add them to train/")
    if missing:
        print(f"warning: no test images of the classes {', '.join(missing)}; they are scored on the others")
    test.samples = test.imgs = [(path, train.class_to_idx[test.classes[label]]) for path, label in test.samples]
    test.targets = [label for _, label in test.samples]
    test.classes, test.class_to_idx = train.classes, train.class_to_idx

@torch.no_grad()
def extract_features(encoder, data, device, mean, std, workers=0):
    """(features (N, D) float32, labels (N,)) on the device, of (uint8 (3, S, S), label) items, in eval mode: BatchNorm
    normalises with its running statistics and leaves them as they are."""
    was_training, start, shown, features, labels = encoder.training, time.time(), time.time(), [], []
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (mean, std))
    encoder.eval()
    for x, y in DataLoader(data, batch_size=256, num_workers=workers, pin_memory=device.type == "cuda",
                           generator=torch.Generator()):  # its own: the run's random state stays as it was
        x = (x.to(device, non_blocking=True).float() / 255 - mean) / std
        features.append(encoder(x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x).float())
        labels.append(y.to(device))
        if time.time() - shown > 10:  # a line every 10 s on large splits
            shown, done = time.time(), sum(map(len, labels))
            print(f"features: {done}/{len(data)} images, {done / (shown - start):.0f} img/s", flush=True)
    encoder.train(was_training)
    return torch.cat(features), torch.cat(labels)

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

def knn_monitor(cfg, device):
    """networks -> {'knn': the student's kNN top-1 (%), 'knn_peer': the peer's}: up to --knn-images labelled training
    images (class-stratified, at least one a class, the same each time) against as many test images. None: off, or an
    image folder without a test split (said in one line)."""
    if not cfg.knn_every:
        return None
    if cfg.dataset == "imagefolder" and not any(os.path.isdir(os.path.join(cfg.data_dir, f)) for f in ("test", "val")):
        print(f"note: --data-dir {cfg.data_dir} has no test/ or val/ folder: this run has no kNN monitor")
        return None
    splits = [load_dataset(cfg.dataset, cfg.data_dir, s, cfg.synthetic_size, cfg.img_size) for s in ("train", "test")]
    align_classes(*splits)
    subsets, rng, info = [], np.random.default_rng(0), DATASETS[cfg.dataset]  # NumPy's generator: torch's is the run's
    for labels, split in ((dataset_labels(s), s) for s in splits):
        share = lambda c: max(1, round(cfg.knn_images * np.mean(labels == c)))  # images of class c
        kept = np.arange(len(labels)) if cfg.knn_images >= len(labels) else np.sort(np.concatenate(
            [rng.permutation(np.flatnonzero(labels == c))[:share(c)] for c in np.unique(labels)]))
        subsets.append(Subset(Transformed(split, resize_crop(cfg.img_size)), kept))
    print(f"kNN monitor: {len(subsets[0])} training images against {len(subsets[1])} test images")
    features = lambda net, subset: extract_features(net.encoder, subset, device, info.mean, info.std)
    return lambda networks: {name: knn_accuracy(*features(net, subsets[0]), *features(net, subsets[1]),
                                                len(splits[0].classes))
                             for name, net in zip(("knn", "knn_peer"), networks) if net is not None}

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
        (cx, cy), r = rng.uniform(0.3, 0.7, size=2), rng.uniform(0.15, 0.35)  # centre; radius, a fraction of the image
        period, phase = rng.uniform(0.12, 0.3), rng.uniform(0, 1)              # the textures' period, likewise
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

# ---- Image folders: torchvision's ImageFolder, through its own hooks -----------------------------
class UnreadableImage(UsageError, OSError):
    """An image that does not decode: the user's to repair, and an OSError (main names the checkpoint kept)."""

class ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's, through its hooks: hidden files and folders (.ipynb_checkpoints, macOS's ._ files) are skipped,
    and so are folders reached through a link (they can loop, or list images twice); 16-bit images keep contrast."""
    def __init__(self, root):
        self.real = os.path.realpath(root)
        super().__init__(root, loader=read_image, is_valid_file=self.keeps)
    def keeps(self, path):  # an image, not hidden, in a folder that the walk reached without a link
        inside = os.path.relpath(path, self.root)
        return (path.lower().endswith(IMAGE_TYPES) and not any(p.startswith(".") for p in inside.split(os.sep))
                and os.path.realpath(os.path.dirname(path)) == os.path.dirname(os.path.join(self.real, inside)))
    @staticmethod
    def find_classes(directory):
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"no class folder in {directory}")
        return classes, {name: i for i, name in enumerate(classes)}

IMAGE_TYPES = torchvision.datasets.folder.IMG_EXTENSIONS

def read_image(path):
    """8-bit RGB. 16-bit images (modes I;16*, and I, as Pillow opens 16-bit PNGs) are scaled by 255 / 65535:
    convert("RGB") would clip them to white. A file that does not decode is one line naming it."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I"):
                img = Image.fromarray(np.round(np.asarray(img, dtype=np.float64).clip(0, 65535) / 257).astype(np.uint8))
            return img.convert("RGB")
    except Exception as err:  # truncated, corrupt, gone since the listing: PIL raises many kinds
        raise UnreadableImage(f"cannot decode the image {path} ({last_line(err)}); repair or remove it") from None

# ---- SimCLR's colour augmentation on the device, a batch at a time (--batch-augment) ----------------
# ssl_augmentation's colour steps batched: the same constants and distributions, each image with its own draws.
# The randomness all comes from uniform() with `generator`, on the images' device: seeded, runs repeat.
def uniform(x, generator, *shape):  # U[0, 1) of the given shape, on the device of x
    return torch.rand(*shape, generator=generator, device=x.device)

@functools.cache
def on_device(values, device):  # a constant, copied to the device once: each copy would make the host wait
    return torch.tensor(values, device=device)

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

def batch_ssl_augmentation(crops, img_size, mean, std, generator=None):
    """The colour steps of ssl_augmentation on crops (crop_flip's), uint8 or [0, 1] float (B, 3, img_size, img_size)
    on any device -> normalised float32, each image with its own draws."""
    x = crops.float() / 255 if crops.dtype == torch.uint8 else crops.float()
    x = color_jitter_grayscale(x, generator=generator)
    if blur_kernel_size(img_size):
        x = _random_blur(x, blur_kernel_size(img_size), generator=generator)
    return (x - on_device(tuple(mean), x.device).view(1, 3, 1, 1)) / on_device(tuple(std), x.device).view(1, 3, 1, 1)

if __name__ == "__main__":
    main()
