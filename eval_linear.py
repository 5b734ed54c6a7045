"""Evaluate the encoder of a dogo.py checkpoint with the protocols of the DoGo paper.

A linear classifier on frozen features (by default the authors' probe), weighted k-nearest neighbours, or
fine-tuning; with all, few (--label-fraction) or noisy (--label-noise) labels; on the data it was trained on or,
with another --dataset, out of distribution. Each run prints a summary and appends one JSON line to --results.

examples:
  python eval_linear.py --checkpoint runs/cifar10_resnet18_resnet50/checkpoint.pt   # linear probe of the student
  python eval_linear.py --checkpoint CKPT --network peer            # ... of its peer
  python eval_linear.py --checkpoint CKPT --protocol knn            # weighted kNN, nothing trained
  python eval_linear.py --checkpoint CKPT --protocol finetune --label-fraction 0.01
  python eval_linear.py --checkpoint CKPT --protocol finetune --label-noise 0.4
  python eval_linear.py --checkpoint CKPT --dataset stl10           # out of distribution, at STL-10's 96 px
  python eval_linear.py --checkpoint random --arch resnet18         # the untrained floor: runs/random/results.jsonl
"""
import dataclasses
import datetime
import fcntl
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import dogo
from dogo import UsageError, dataset_labels, flag, knn_scores, require

# ---- Config --------------------------------------------------------------------------------------
@dataclasses.dataclass
class EvalConfig:
    checkpoint: str = flag("", "checkpoint.pt written by dogo.py, or random: an untrained encoder, the floor to beat")
    network: str = flag("student", "which of the checkpoint's networks", ("student", "peer"))
    arch: str = flag("auto", "--checkpoint random's (auto: resnet18); a checkpoint has its own", ("auto", *dogo.ARCHS))
    img_size: int = flag(0, "for --checkpoint random (0 = the dataset's own); a checkpoint uses its own")
    dataset: str = flag("auto", "auto: the checkpoint's (cifar10 for random); another: out of distribution",
                        ("auto", *dogo.DATASETS))
    data_dir: str = flag("", "'' = the checkpoint's --data-dir (./data for random)")
    synthetic_size: int = flag(0, "images in the synthetic training split; 0 = the checkpoint's (2000 for random)")
    protocol: str = flag("linear", "linear classifier or weighted kNN on frozen features, or encoder and a new head "
                                   "fine-tuned together", ("linear", "knn", "finetune"))
    label_fraction: float = flag(1.0, "share of the training labels kept, stratified by class (the paper: 0.01, 0.1)")
    label_noise: float = flag(0.0, "share of the kept training labels changed to a wrong class")
    noise_type: str = flag("symmetric", "symmetric: to any other class; asymmetric: to a similar one (CIFAR-10's "
                           "pairs, CIFAR-100's superclasses, else c -> c + 1)", ("symmetric", "asymmetric"))
    val_fraction: float = flag(0.15, "share of the kept training images held out to choose the epoch")
    epochs: int = flag(100, "epochs of training the classifier (linear) or the whole network (finetune)")
    batch_size: int = flag(0, "training images per step; 0 = 64 for linear (the authors'), 256 for finetune")
    lr: float = flag(3e-4, "Adam learning rate; finetune follows a cosine schedule from it")
    weight_decay: float = flag(1e-6, "linear: Adam's weight decay (finetune uses none)")
    standardise: bool = flag(False, "linear: features to zero mean, unit variance (off: the authors' raw ones)")
    workers: int = flag(min(8, os.cpu_count() or 1), "data-loading processes; 0 loads in the main process")
    device: str = flag("auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    seed: int = flag(0, "seed for the label subset, the noise, the validation split and training")
    results: str = flag("", "JSON-lines file to append to; '' = results.jsonl beside the checkpoint, or runs/random/")

def check_args(cfg):
    """Refuse values that cannot work: the flags' own bounds, and their combinations."""
    require(cfg, "label_fraction", lambda v: 0 < v <= 1, "above 0 and at most 1")
    require(cfg, "label_noise", lambda v: 0 <= v < 1, "at least 0 and below 1")
    require(cfg, "val_fraction", lambda v: 0 <= v < 1, "at least 0 and below 1")
    # Adam's first step moves by lr / (1 - 0.9), which must stay a float32 number
    require(cfg, "lr", lambda v: 0 < v <= torch.finfo(torch.float32).max / 10, "a positive number up to 3.4e37")
    require(cfg, "weight_decay", lambda v: 0 <= v < math.inf, "0 or more")
    for name in ("img_size", "synthetic_size", "workers", "batch_size"):
        require(cfg, name, lambda v: v >= 0, "0 or more")
    require(cfg, "epochs", lambda v: v >= 1, "at least 1")
    require(cfg, "seed", lambda v: 0 <= v < 2 ** 32, "from 0 to 4294967295")  # NumPy's seeds
    if not cfg.checkpoint:
        raise UsageError("--checkpoint is missing; give a checkpoint.pt that dogo.py wrote, or random")
    if cfg.checkpoint == "random" and cfg.network == "peer":
        raise UsageError("--network peer needs a checkpoint with a peer; --checkpoint random is a single encoder")
    if cfg.protocol == "finetune" and cfg.batch_size == 1:  # BatchNorm trains on 2 images or more
        raise UsageError(f"--batch-size must be at least 2 to fine-tune (or 0), got {cfg.batch_size}")

# ---- Labels: few and noisy (pure functions of a list, NumPy array or tensor of class indices) ----
# Standard asymmetric noise on CIFAR-10 (Patrini et al. 2017): each class is confused with a
# similar-looking one. truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog.
CIFAR10_ASYMMETRIC = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}

# CIFAR-100's 20 superclasses of 5 classes each (Krizhevsky 2009), by fine-class name.
CIFAR100_SUPERCLASSES = {group: tuple(names.split()) for group, names in {
    "aquatic mammals": "beaver dolphin otter seal whale", "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip", "food containers": "bottle bowl can cup plate",
    "fruit and vegetables": "apple mushroom orange pear sweet_pepper",
    "household electrical devices": "clock keyboard lamp telephone television",
    "household furniture": "bed chair couch table wardrobe",
    "insects": "bee beetle butterfly caterpillar cockroach", "large carnivores": "bear leopard lion tiger wolf",
    "large man-made outdoor things": "bridge castle house road skyscraper",
    "large natural outdoor scenes": "cloud forest mountain plain sea",
    "large omnivores and herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium-sized mammals": "fox porcupine possum raccoon skunk",
    "non-insect invertebrates": "crab lobster snail spider worm", "people": "baby boy girl man woman",
    "reptiles": "crocodile dinosaur lizard snake turtle", "small mammals": "hamster mouse rabbit shrew squirrel",
    "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles 1": "bicycle bus motorcycle pickup_truck train",
    "vehicles 2": "lawn_mower rocket streetcar tank tractor",
}.items()}
# Class index = position in the alphabetical list of the 100 names, as in torchvision's CIFAR100.
CIFAR100_CLASSES = tuple(sorted(name for names in CIFAR100_SUPERCLASSES.values() for name in names))
# Standard asymmetric noise on CIFAR-100: each class to the next of its superclass, the fifth back
# to the first (beaver -> dolphin -> otter -> seal -> whale -> beaver).
CIFAR100_ASYMMETRIC = {CIFAR100_CLASSES.index(names[i]): CIFAR100_CLASSES.index(names[(i + 1) % len(names)])
                       for names in CIFAR100_SUPERCLASSES.values() for i in range(len(names))}
ASYMMETRIC_NOISE = {"cifar10": CIFAR10_ASYMMETRIC, "cifar100": CIFAR100_ASYMMETRIC}  # else c -> c+1

def _as_numpy(labels):
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    return np.asarray(labels, dtype=np.int64).reshape(-1)

def subsample_labels(labels, fraction, seed):
    """Sorted int64 indices of a class-stratified, seeded subset: round(fraction * n_c) of the n_c images
    of each class c, and at least one, so that no class disappears."""
    labels = _as_numpy(labels)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    kept = [rng.choice(members, size=max(1, round(fraction * len(members))), replace=False)
            for members in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)

def corrupt_labels(labels, rate, num_classes, kind, seed):
    """A noisy copy of `labels` (an int64 NumPy array; the input is left alone), seeded.

    kind 'symmetric': exactly round(rate * N) labels, chosen uniformly, each move to one of the other
    C - 1 classes: the share changed is `rate` (the convention that draws over all C classes, the true
    one included, changes rate * (C - 1) / C). 'asymmetric': in every class c, exactly round(rate * n_c)
    labels move to class (c + 1) mod C; or a dict {class: class} such as CIFAR10_ASYMMETRIC, the same
    rule for the classes it maps, the others left clean."""
    labels = _as_numpy(labels)
    if not 0 <= rate < 1:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    if num_classes < 2 or (len(labels) and not 0 <= labels.min() <= labels.max() < num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, with at least two classes")
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    if kind == "symmetric":
        chosen = rng.choice(len(labels), size=round(rate * len(labels)), replace=False)
        # An offset of 1..C-1 reaches every other class with equal chance, never the old one.
        noisy[chosen] = (labels[chosen] + rng.integers(1, num_classes, len(chosen))) % num_classes
        return noisy
    mapping = {c: (c + 1) % num_classes for c in range(num_classes)} if kind == "asymmetric" else kind
    if not isinstance(mapping, dict) or any(s == t or not 0 <= t < num_classes for s, t in mapping.items()):
        raise ValueError(f"kind must be 'symmetric', 'asymmetric' or a map to other classes, got {kind!r}")
    for source, target in sorted(mapping.items()):
        members = np.flatnonzero(labels == source)  # clean labels: a cat made a dog stays a dog
        noisy[rng.choice(members, size=round(rate * len(members)), replace=False)] = target
    return noisy

def split_validation(labels, fraction, seed):
    """Positions (fit, validation) in `labels`: a class-stratified, seeded share held out for
    choosing the epoch (the authors' split is plain random). Every class keeps an image to fit on."""
    fit = subsample_labels(labels, 1 - fraction, seed)
    return fit, np.setdiff1d(np.arange(len(_as_numpy(labels))), fit)

# ---- Encoder and data ----------------------------------------------------------------------------
def load_encoder(cfg):
    """The encoder f to evaluate (the checkpoint's --network, or an untrained one, seeded) and what it is."""
    if cfg.checkpoint == "random":
        torch.manual_seed(cfg.seed)
        arch, dataset = {"auto": "resnet18"}.get(cfg.arch, cfg.arch), {"auto": "cifar10"}.get(cfg.dataset, cfg.dataset)
        img_size = cfg.img_size or dogo.DATASETS[dataset].img_size
        net = dogo.SSLNet(arch, img_size)
        return net.encoder, dict(arch=arch, feature_dim=net.feature_dim, img_size=img_size, trained_on=None,
                                 step=0, data_dir="./data", synthetic_size=dogo.Config.synthetic_size, sha256=None)
    saved = dogo.load_checkpoint(cfg.checkpoint, flag="--checkpoint")
    net = saved.student if cfg.network == "student" else saved.peer
    if net is None:
        raise UsageError(f"--network peer: {cfg.checkpoint} was trained alone and has no peer; use --network student")
    for name, given, own in (("--arch", cfg.arch, net.arch), ("--img-size", cfg.img_size, saved.cfg.img_size)):
        if given not in (0, "auto") and given != own:
            raise UsageError(f"{name} {given} differs from the checkpoint's {own}; drop {name}, for random only")
    return net.encoder, dict(arch=net.arch, feature_dim=net.feature_dim, img_size=saved.cfg.img_size,
                             trained_on=saved.cfg.dataset, step=saved.step, data_dir=saved.cfg.data_dir,
                             synthetic_size=saved.cfg.synthetic_size, sha256=saved.sha256)

def check_unchanged(module, before):
    """Raise if any tensor of module's state (BatchNorm statistics too) differs from the snapshot `before`."""
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v.cpu(), before[k].cpu())]
    if changed:
        raise RuntimeError(f"the frozen encoder changed during evaluation: {', '.join(changed[:5])}")

class LabelledImages(Dataset):
    """The images of `base` at `indices` through `transform`, labelled with `labels` (the kept ones, maybe noisy)."""
    def __init__(self, base, indices, labels, transform):
        self.base, self.indices, self.labels, self.transform = base, indices, labels, transform
    def __len__(self):
        return len(self.indices)
    def __getitem__(self, i):
        return self.transform(self.base[int(self.indices[i])][0]), int(self.labels[i])

def require_finite(values, what, fix):
    """Refuse non-finite features, losses or scores: a figure made from them would mean nothing."""
    if not torch.isfinite(torch.as_tensor(values)).all():
        raise UsageError(f"{what} are not finite: {fix}")

BROKEN = "its weights are broken; evaluate an earlier checkpoint, or train again with a lower --lr"

def diverged(cfg):
    """The fix for a classifier or network whose training went non-finite."""
    return f"{cfg.protocol} training diverged at --lr {cfg.lr:g}; give a lower --lr"

# ---- Classifiers: scores, the linear probe, fine-tuning ------------------------------------------
def topk_accuracy(scores, labels, k):
    """Percentage of rows of scores (N, C) whose true label is among their k highest scores."""
    return 100.0 * (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum().item() / len(labels)

def accuracies(scores, labels, num_classes):
    """{'top1', 'top5'} in percent; top-5 only with 20 classes or more, where it says something."""
    return {"top1": topk_accuracy(scores, labels, 1),
            "top5": topk_accuracy(scores, labels, 5) if num_classes >= 20 else None}

@torch.no_grad()
def train_linear(x_fit, y_fit, x_val, y_val, num_classes, epochs, lr, seed, batch_size, weight_decay=0.0):
    r"""A linear classifier on fixed features (N, D), trained with Adam on the mean cross-entropy of
    mini-batches. Returns it at its best epoch on (x_val, y_val) (a tie: the later epoch, which has fitted
    the training set better; without a validation set, the last), that epoch, and its validation top-1 in
    percent (None without a validation set). It computes what this plain loop would, in under half its
    time on a CPU (no autograd, no optimiser object) and with no wait on a GPU but ten progress lines:

        torch.manual_seed(seed); classifier = nn.Linear(D, num_classes); order = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(classifier.parameters(), lr, weight_decay=weight_decay)
        for epoch in range(epochs):
            for batch in torch.randperm(N, generator=order).split(batch_size):
                optimizer.zero_grad(); F.cross_entropy(classifier(x_fit[batch]), y_fit[batch]).backward()
                optimizer.step()

    The gradient, for p = softmax(x W^T + b) and one-hot targets Y of a batch of B:
    :math:`\nabla_{[W|b]} = \frac{1}{B} (p - Y)^\top [x, 1] + \lambda [W|b]` (lambda: weight_decay)."""
    device, (n, d) = x_fit.device, x_fit.shape
    torch.manual_seed(seed)
    classifier = nn.Linear(d, num_classes).to(device)  # PyTorch's initialisation, as in the loop
    # theta = [W | b] and features with a column of ones: x W^T + b = [x, 1] theta^T, one operation for both
    theta = torch.cat([classifier.weight, classifier.bias[:, None]], dim=1)         # (C, D+1)
    theta_t = theta.T                                    # a view: it follows theta's updates
    x_fit, x_val = (torch.cat([x, x.new_ones(len(x), 1)], dim=1) for x in (x_fit, x_val))
    targets = F.one_hot(y_fit, num_classes).to(x_fit.dtype)                         # (N, C)
    grad, m, v = torch.zeros_like(theta), torch.zeros_like(theta), torch.zeros_like(theta)
    beta1, beta2, eps = 0.9, 0.999, 1e-8                 # torch.optim.Adam's defaults
    best_theta, best_epoch, best_correct = theta.clone(), *torch.tensor([epochs, -1], device=device)
    order, t, start, every = torch.Generator().manual_seed(seed), 0, time.time(), max(1, epochs // 10)
    for epoch in range(1, epochs + 1):
        # The order is drawn on the CPU (the same on every device) and applied to the whole set at once,
        # so that a batch is a slice; pinned, its copy to a GPU need not wait for the previous epoch there.
        permutation = torch.randperm(n, generator=order)
        permutation = (permutation.pin_memory() if device.type == "cuda" else permutation).to(device, non_blocking=True)
        x_epoch, targets_epoch = x_fit[permutation], targets[permutation]                # (N, D+1), (N, C)
        for i in range(0, n, batch_size):
            x, y = x_epoch[i:i + batch_size], targets_epoch[i:i + batch_size]       # (B, D+1), (B, C)
            error = torch.mm(x, theta_t).softmax(dim=1).sub_(y)                     # (B, C): p - Y
            torch.addmm(theta, error.T, x, beta=weight_decay, alpha=1 / len(x), out=grad)
            t += 1
            m.lerp_(grad, 1 - beta1)  # Adam's moments and step (Kingma & Ba 2015, Alg. 1 and the remark after it)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            root = math.sqrt(1 - beta2 ** t)
            theta.addcdiv_(m, v.sqrt().add_(eps * root), value=-lr * root / (1 - beta1 ** t))
        if len(y_val):  # kept on the device: whether this epoch is the best is a tensor too
            correct = (torch.mm(x_val, theta_t).argmax(dim=1) == y_val).sum()
            better = correct >= best_correct
            best_theta = torch.where(better, theta, best_theta)
            best_epoch = torch.where(better, epoch, best_epoch)
            best_correct = torch.maximum(correct, best_correct)
        if epoch % every == 0 or epoch == epochs:  # the only waits on the device: ten in a run
            loss = F.cross_entropy(torch.mm(x_fit, theta_t), y_fit).item()
            print(f"linear epoch {epoch}/{epochs} | loss {loss:.4f} on the training features"
                  + (f" | validation top-1 {100 * correct.item() / len(y_val):.2f}%" if len(y_val) else "")
                  + f" | {epoch * n / (time.time() - start):,.0f} features/s", flush=True)
    best_theta = best_theta if len(y_val) else theta
    if not (math.isfinite(loss) and torch.isfinite(best_theta).all()):
        raise UsageError(f"the linear classifier's loss or weights are not finite after {epochs} epochs: "
                         f"training diverged at --lr {lr:g}; give a lower --lr")
    classifier.weight.copy_(best_theta[:, :d])
    classifier.bias.copy_(best_theta[:, d])
    return classifier, int(best_epoch), 100 * best_correct.item() / len(y_val) if len(y_val) else None

def linear_accuracy(train_features, train_labels, test_features, test_labels, num_classes, epochs=100, lr=3e-4,
                    seed=0, batch_size=64, val_fraction=0.15, weight_decay=1e-6, standardise_features=False):
    """Linear evaluation on given features (N, D), by default the authors' protocol: a seeded validation share
    held out, the classifier of the epoch that validates best tested on every test feature (theirs drops the
    last partial batch). Returns {top1, top5, best_epoch, val_top1, train_images, val_images, train_steps}."""
    device = train_features.device
    y_train, y_test = (torch.as_tensor(_as_numpy(y), device=device) for y in (train_labels, test_labels))
    fit, val = split_validation(y_train, val_fraction, seed)
    x_fit, x_val, x_test = train_features[fit], train_features[val], test_features
    if standardise_features:  # with the fitted features' statistics: one lr then serves every encoder's scale
        mean, std = x_fit.mean(dim=0), x_fit.std(dim=0).clamp_min(1e-6)
        x_fit, x_val, x_test = ((x - mean) / std for x in (x_fit, x_val, x_test))
    # One CPU thread: a linear classifier's products are too small to gain from more, and on a busy
    # machine each of them would wait for the slowest thread, an epoch many times over.
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if device.type == "cpu" else threads)
    try:
        classifier, best_epoch, val_top1 = train_linear(x_fit, y_train[fit], x_val, y_train[val], num_classes,
                                                        epochs, lr, seed, batch_size, weight_decay)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        scores = classifier(x_test)
    require_finite(scores, "the linear classifier's test scores", f"give a lower --lr than {lr:g}")
    return {**accuracies(scores, y_test, num_classes), "best_epoch": best_epoch, "val_top1": val_top1,
            "train_images": len(fit), "val_images": len(val),
            "train_steps": epochs * math.ceil(len(fit) / batch_size)}  # train_linear's batches

def random_crop_flip(x, padding, generator=None):
    """The standard supervised augmentation of a batch (B, C, S, S), each image its own draw: an S x S crop of the
    image padded with zeros on every side, flipped with probability 1/2; a flip reads the crop's columns backwards."""
    b, c, s, _ = x.shape
    padded = F.pad(x, (padding,) * 4)                                    # (B, C, S + 2p, S + 2p)
    dy, dx = torch.randint(0, 2 * padding + 1, (2, b, 1), device=x.device, generator=generator)  # (B, 1) each
    flip = torch.rand(b, 1, device=x.device, generator=generator) < 0.5
    steps = torch.arange(s, device=x.device)
    rows, cols = dy + steps, dx + torch.where(flip, s - 1 - steps, steps)  # (B, S) each
    images, channels = torch.arange(b, device=x.device), torch.arange(c, device=x.device)
    return padded[images[:, None, None, None], channels[:, None, None], rows[:, None, :, None], cols[:, None, None, :]]

def loader(data, cfg, device, **kwargs):
    """A loader whose worker processes start once and serve every epoch."""
    return DataLoader(data, batch_size=cfg.batch_size, num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                      pin_memory=device.type == "cuda", **kwargs)

@torch.no_grad()
def predict(model, batches, normalise, device):
    """(scores, labels) of a network over a loader of (uint8 image, label), in eval mode."""
    model.eval()
    scores, labels = [], []
    for x, y in batches:
        scores.append(model(normalise(x.to(device, non_blocking=True))).float())
        labels.append(y.to(device))
    return torch.cat(scores), torch.cat(labels)

def finetune(encoder, feature_dim, fit_set, val_set, num_classes, cfg, device, normalise):
    """Encoder and a new linear head trained together on labelled uint8 images, augmented on the device a batch at
    a time, with Adam and a cosine schedule -> the network at its best epoch, that epoch, its validation top-1
    (None without a validation set) and the optimiser steps taken."""
    torch.manual_seed(cfg.seed)
    model = nn.Sequential(encoder, nn.Linear(feature_dim, num_classes)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # Every image in every epoch, the last partial batch included; but BatchNorm cannot train on
    # a batch of one, so a last batch of a single image (a different one each epoch) is dropped.
    batches = loader(fit_set, cfg, device, shuffle=True, drop_last=len(fit_set) % cfg.batch_size == 1,
                     generator=torch.Generator().manual_seed(cfg.seed))
    val_batches = loader(val_set, cfg, device) if len(val_set) else None
    # The schedule is stepped every batch, so its period counts batches, not epochs.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * len(batches))
    best, steps = (0, None, None), 0  # epoch, validation top-1, weights
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        start, losses, seen = time.time(), [], 0
        for x, y in batches:
            x = normalise(x.to(device, non_blocking=True))               # (B, 3, S, S)
            # padded with zeros after normalising: the dataset's mean colour, as CIFAR's recipe pads
            loss = F.cross_entropy(model(random_crop_flip(x, x.shape[-1] // 8)), y.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.detach())  # read once an epoch: a GPU never waits for the host
            seen, steps = seen + len(y), steps + 1
        losses = torch.stack(losses)
        require_finite(losses, f"the fine-tuning losses of epoch {epoch}", diverged(cfg))
        speed, val = seen / (time.time() - start), None
        if val_batches:
            scores, labels = predict(model, val_batches, normalise, device)
            require_finite(scores, f"the validation scores of epoch {epoch}", diverged(cfg))
            val = topk_accuracy(scores, labels, 1)
        if val is None or best[1] is None or val >= best[1]:  # a tie: the later epoch, as train_linear's
            best = (epoch, val, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        print(f"finetune epoch {epoch}/{cfg.epochs} | loss {losses.mean():.4f}"
              + (f" | validation top-1 {val:.2f}%" if val is not None else "") + f" | {speed:.0f} img/s", flush=True)
    model.load_state_dict(best[2])
    return model, *best[:2], steps

# ---- Main ----------------------------------------------------------------------------------------
def results_path(cfg):
    """The --results file, refused now rather than after the work if it cannot take a result line: a folder, a
    path under a file, an existing file that is not a results file (a checkpoint, say)."""
    folder = os.path.join("runs", "random") if cfg.checkpoint == "random" else os.path.dirname(cfg.checkpoint)
    path = cfg.results or os.path.join(folder, "results.jsonl")
    read_results(path)
    return path

def read_results(path):
    """The bytes of a results file (none if there is none), refused unless each line is a JSON object."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:  # none yet; its folders are made when the line is written
        return b""
    except OSError as err:  # a folder, a path under a file, no permission
        raise UsageError(f"--results {path}: cannot use it ({err.strerror}); give another file") from None
    for number, line in enumerate(data.splitlines(), 1):
        try:
            fine = not line.strip() or isinstance(json.loads(line), dict)
        except ValueError:  # not UTF-8 (a checkpoint, say), or not JSON
            fine = False
        if not fine:
            raise UsageError(f"--results {path}: not a results file (line {number} is not a JSON object); "
                             f"give a .jsonl file that eval_linear.py wrote, or a new one")
    return data

def append_result(path, result):
    """Add the result's JSON line to the file, rewritten whole: a failed write (a full disk) leaves the file as it
    was, where appending in place could leave half a line in it."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        lock = os.open(folder, os.O_RDONLY)
    except OSError as err:
        raise UsageError(f"--results {path}: cannot write there ({err.strerror}); give another file") from None
    try:  # evaluations may run side by side: one at a time reads the file and replaces it
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = read_results(path)
        if old and not old.endswith(b"\n"):  # a last line without its newline stays apart from the new one
            old += b"\n"
        with dogo.atomic_file(path) as f:
            f.write(old + (json.dumps(result) + "\n").encode())
    finally:
        os.close(lock)  # releases the lock

def training_labels(labels, num_classes, dataset, cfg):
    """(indices of the kept training images, their labels, how many are wrong); test labels stay clean."""
    if num_classes < 2:  # a classifier has nothing to tell apart: 100% would mean nothing
        raise UsageError(f"{dataset} has {num_classes} class: evaluation needs two classes or more")
    kept = subsample_labels(labels, cfg.label_fraction, cfg.seed)
    if cfg.label_noise == 0:
        return kept, labels[kept], 0
    kind = ASYMMETRIC_NOISE.get(dataset, "asymmetric") if cfg.noise_type == "asymmetric" else "symmetric"  # CIFAR's
    noisy = corrupt_labels(labels[kept], cfg.label_noise, num_classes, kind, cfg.seed + 1)
    return kept, noisy, int((noisy != labels[kept]).sum())

def frozen_protocol(encoder, splits, kept, labels, num_classes, cfg, info, device):
    """linear or knn on the frozen encoder's features of the kept training images and of the test split; the
    encoder, BatchNorm statistics included, is checked to end as it began. Returns fields of the result line."""
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    encoder.requires_grad_(False)
    start, sized, stats = time.time(), dogo.resize_crop(info["eval_size"]), dogo.DATASETS[info["dataset"]]
    # Normalised with the statistics of the data evaluated on: out of distribution, not the training data's.
    features = {}
    for name, data in (("train", LabelledImages(splits["train"], kept, labels, sized)),
                       ("test", dogo.Transformed(splits["test"], sized))):
        print(f"features of the {name} split ({len(data)} images)", flush=True)
        features[name] = dogo.extract_features(encoder, data, device, stats.mean, stats.std, cfg.workers)
        require_finite(features[name][0], f"the {name} features of --checkpoint {cfg.checkpoint}", BROKEN)
    (x_train, _), (x_test, y_test) = features["train"], features["test"]  # (N, feature_dim), labels (N,)
    feature_seconds, start = time.time() - start, time.time()
    if cfg.protocol == "linear":
        # seed + 2: the validation split is drawn apart from the label subset and the noise
        fields = linear_accuracy(x_train, labels, x_test, y_test, num_classes, cfg.epochs, cfg.lr, cfg.seed + 2,
                                 cfg.batch_size, cfg.val_fraction, cfg.weight_decay, cfg.standardise)
    else:
        scores = knn_scores(x_train, labels, x_test, num_classes)
        require_finite(scores, f"the kNN scores of --checkpoint {cfg.checkpoint}", BROKEN)
        fields = {**accuracies(scores, y_test, num_classes), "best_epoch": None, "val_top1": None,
                  "train_images": len(kept), "val_images": 0, "train_steps": None}
    check_unchanged(encoder, before)
    return {**fields, "test_images": len(y_test), "feature_seconds": feature_seconds,
            "train_seconds": time.time() - start}

def finetune_protocol(encoder, splits, kept, labels, num_classes, cfg, info, device):
    """finetune: encoder and head trained on the kept labelled images, tested at the epoch that validates best."""
    start, sized = time.time(), dogo.resize_crop(info["eval_size"])
    fit, val = split_validation(labels, cfg.val_fraction, cfg.seed + 2)  # positions in `kept`
    if len(fit) < 2:  # BatchNorm cannot train on a single image
        raise UsageError(f"--protocol finetune needs two training images or more, and "
                         f"--label-fraction {cfg.label_fraction} leaves {len(fit)}; raise it")
    fit_set, val_set = (LabelledImages(splits["train"], kept[i], labels[i], sized) for i in (fit, val))
    stats = dogo.DATASETS[info["dataset"]]  # uint8 images on the device -> floats, normalised as training does
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (stats.mean, stats.std))
    normalise = lambda x: (x.float() / 255 - mean) / std  # noqa: E731
    model, epoch, val_top1, steps = finetune(encoder, info["feature_dim"], fit_set, val_set, num_classes, cfg,
                                             device, normalise)
    scores, y_test = predict(model, loader(dogo.Transformed(splits["test"], sized), cfg, device), normalise, device)
    require_finite(scores, "the fine-tuned network's test scores", diverged(cfg))
    return {**accuracies(scores, y_test, num_classes), "best_epoch": epoch, "val_top1": val_top1,
            "train_images": len(fit), "val_images": len(val), "train_steps": steps, "test_images": len(y_test),
            "feature_seconds": None, "train_seconds": time.time() - start}

def evaluate(cfg):
    """Run one evaluation as cfg describes it; print a summary, append its JSON line to --results, return it."""
    check_args(cfg)
    cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size or {"linear": 64, "finetune": 256}.get(cfg.protocol, 0))
    device = dogo.pick_device(cfg.device)
    encoder, info = load_encoder(cfg)
    out = results_path(cfg)  # after the checkpoint, which names its default folder
    dataset = info["trained_on"] or "cifar10" if cfg.dataset == "auto" else cfg.dataset
    # Out of distribution, images are seen at that dataset's own size, as the authors' util/test.py sizes them.
    size = info["img_size"] if info["trained_on"] in (None, dataset) else dogo.DATASETS[dataset].img_size
    info.update(dataset=dataset, data_dir=cfg.data_dir or info["data_dir"],
                synthetic_size=cfg.synthetic_size or info["synthetic_size"], eval_size=size)
    splits = {s: dogo.load_dataset(dataset, info["data_dir"], s, info["synthetic_size"], info["eval_size"])
              for s in ("train", "test")}
    dogo.align_classes(splits["train"], splits["test"])
    all_labels = dataset_labels(splits["train"])
    num_classes = len(getattr(splits["train"], "classes", [])) or int(all_labels.max()) + 1
    kept, labels, wrong = training_labels(all_labels, num_classes, dataset, cfg)
    protocol, linear = finetune_protocol if cfg.protocol == "finetune" else frozen_protocol, cfg.protocol == "linear"
    fields = protocol(encoder.to(device), splits, kept, labels, num_classes, cfg, info, device)
    result = {
        "checkpoint": cfg.checkpoint, "checkpoint_sha256": info["sha256"], "step": info["step"],
        "network": cfg.network, "arch": info["arch"], "trained_on": info["trained_on"],
        "dataset": dataset, "img_size": info["eval_size"], "protocol": cfg.protocol,
        "label_fraction": cfg.label_fraction, "label_noise": cfg.label_noise,
        "noise_type": cfg.noise_type, "labels_changed": wrong, "seed": cfg.seed,
        **{k: v if cfg.protocol != "knn" else None for k, v in dict(  # what trained, where anything did
            epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay if linear else 0.0,
            standardise=cfg.standardise if linear else None).items()},
        **fields, **dogo.ran_on(device), "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    for key in ("top1", "top5", "val_top1", "feature_seconds", "train_seconds"):
        result[key] = None if result[key] is None else round(result[key], 2)
    print_summary(result)  # first: a disk too full for the line still shows the figure
    append_result(out, result)
    print(f"  appended to {out}")
    return result

def print_summary(r):
    """The result line, for a person."""
    trained = f"step {r['step']}, trained on {r['trained_on']}" if r["trained_on"] else "untrained"
    top5 = f", top-5 {r['top5']:.2f}%" if r["top5"] is not None else ""
    chosen = (f" at epoch {r['best_epoch']}/{r['epochs']}" if r["best_epoch"] else "") + (
        f", chosen on validation ({r['val_top1']:.2f}%)" if r["val_top1"] is not None else "")
    kind = {True: ", standardised features", False: ", raw features", None: ""}[r["standardise"]]
    settings = r["lr"] and f"  Adam lr {r['lr']:g}, weight decay {r['weight_decay']:g}, batch {r['batch_size']}{kind}\n"
    features = f"features {r['feature_seconds']:.1f} s, " if r["feature_seconds"] is not None else ""
    steps = f" ({r['train_steps']} steps)" if r["train_steps"] is not None else ""
    print(f"\n{r['protocol']} evaluation of the {r['network']} {r['arch']} of {r['checkpoint']} ({trained}) on "
          f"{r['dataset']}\n  labels: {r['train_images']} images to train on, {r['val_images']} to validate, "
          f"{r['labels_changed']} of them wrong; {r['test_images']} test images at {r['img_size']} px\n"
          f"{settings or ''}  test top-1 {r['top1']:.2f}%{top5}{chosen}\n"
          f"  time: {features}{r['protocol']} {r['train_seconds']:.1f} s{steps}")

def main(argv=None):
    """The command line; returns the result line as a dict, so that Python can drive it too."""
    try:
        return evaluate(dogo.parse_flags(EvalConfig, argv, "eval_linear.py", __doc__)[0])
    except UsageError as err:  # dogo.last_line: a loader worker's error arrives with its traceback
        print(f"eval_linear.py: error: {dogo.last_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("eval_linear.py: stopped by Ctrl-C; nothing was recorded", file=sys.stderr)
        sys.exit(130)

if __name__ == "__main__":
    main()
