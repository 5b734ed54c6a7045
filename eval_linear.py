"""Evaluate the encoder of a dogo.py checkpoint with the protocols of the DoGo paper.

A linear classifier on frozen features, weighted k-nearest neighbours, or fine-tuning; with all,
few (--label-fraction) or noisy (--label-noise) labels; on the data it was trained on or out of
distribution (--dataset).

Usage:
    python eval_linear.py --checkpoint runs/cifar10_resnet18_resnet50/checkpoint.pt    # linear
    python eval_linear.py --checkpoint runs/cifar10_resnet18_resnet50/checkpoint.pt --network peer
    python eval_linear.py --checkpoint CKPT --protocol knn                # no training at all
    python eval_linear.py --checkpoint CKPT --protocol finetune --label-fraction 0.01
    python eval_linear.py --checkpoint CKPT --protocol finetune --label-noise 0.4
    python eval_linear.py --checkpoint CKPT --dataset stl10               # out of distribution
    python eval_linear.py --checkpoint random --arch resnet18             # the untrained floor

The linear probe's defaults are the authors' protocol: the frozen encoder in eval mode, its raw
features of unaugmented images (resized and normalised), a linear layer trained with Adam (lr 3e-4,
weight decay 1e-6, batch 64) for 100 epochs without a schedule, 15% of the training images held out
to choose the epoch whose classifier is tested. This project's own choices are said so where they
are made: --standardise (off by default), a class-stratified held-out share, the whole test split
scored, and fine-tuning's batch of 256 with a cosine schedule.

Every run prints a summary and appends one JSON line to --results (default: results.jsonl beside
the checkpoint). Frozen-encoder features are cached beside the checkpoint, so that a second linear
or kNN evaluation of the same network on the same data skips the encoder entirely.
File layout: config, labels (few and noisy), encoder, features, the three protocols, main.
"""
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

try:  # seconds of importing torch: a Ctrl-C meanwhile ends in one line, not a traceback
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import v2

    import dogo
    from dogo import UsageError, dataset_labels, flag, knn_accuracy, knn_scores, parse_flags, pick_device, require
except KeyboardInterrupt:
    print("eval_linear.py: stopped by Ctrl-C while starting; nothing was evaluated", file=sys.stderr)
    sys.exit(130)


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    # what to evaluate
    checkpoint: str = flag("", "checkpoint.pt written by dogo.py, or 'random': an untrained "
                               "encoder, the floor that every self-supervised result must beat")
    network: str = flag("student", "the checkpoint's student (its --arch network), or its peer", ("student", "peer"))
    arch: str = flag("", "architecture for --checkpoint random ('' = resnet18); a checkpoint "
                         "names its own", ("",) + dogo.ARCHS)
    img_size: int = flag(0, "input size for --checkpoint random (0 = the dataset's own); a "
                            "checkpoint's encoder sees its training size on its training data, "
                            "else the evaluated dataset's own size, as the authors'")
    # data
    dataset: str = flag("", "'' = the checkpoint's (cifar10 for random); any other is an "
                            "out-of-distribution evaluation", ("",) + tuple(dogo.DATASETS))
    data_dir: str = flag("", "'' = the checkpoint's --data-dir (./data for random); for "
                             "imagefolder, a folder with train/ and test/ or val/")
    synthetic_size: int = flag(0, "images in the synthetic training split (test: a quarter); "
                                  "0 = the checkpoint's (2000 for random)")
    # protocol
    protocol: str = flag("linear", "linear: a linear classifier on frozen features; knn: "
                                   "weighted k-nearest neighbours on frozen features; finetune: "
                                   "encoder and a new head trained together",
                         ("linear", "knn", "finetune"))
    label_fraction: float = flag(1.0, "share of the labelled training images kept, stratified "
                                      "by class (the paper: 0.01 and 0.1)")
    label_noise: float = flag(0.0, "share of the kept training labels changed to a wrong class")
    noise_type: str = flag("symmetric", "symmetric: exactly round(R x N) of the N labels move, each "
                                        "to one of the other C - 1 classes (the other common "
                                        "convention, a uniform draw over all C classes with the "
                                        "true one included, changes only R x (C - 1) / C of them); "
                                        "asymmetric: exactly round(R x n_c) of each class c move to "
                                        "a similar class: CIFAR-10's standard pairs, on CIFAR-100 "
                                        "the next class of the same superclass, on other datasets "
                                        "class c -> c + 1 (mod C), which is no similarity at all",
                           ("symmetric", "asymmetric"))
    val_fraction: float = flag(0.15, "share of the kept training images held out to choose the "
                                     "epoch (linear, finetune); 0.15 as in the authors' code, "
                                     "stratified by class here where theirs is a plain random split")
    # optimisation
    epochs: int = flag(100, "epochs of training the classifier (linear, 100 as the authors) or "
                            "the whole network (finetune); knn trains nothing")
    batch_size: int = flag(0, "training examples per step; 0 = 64 for linear (the authors'), 256 "
                              "for finetune (this project's: fewer, faster steps on the CPU, and "
                              "BatchNorm statistics from more images); feature extraction and "
                              "scoring always run 256 images at a time")
    lr: float = flag(3e-4, "Adam learning rate, for linear (the authors') and finetune (this "
                           "project's, with a cosine schedule) alike")
    weight_decay: float = flag(1e-6, "linear: Adam's weight decay (an L2 term added to the "
                                     "gradient of weight and bias), 1e-6 as the authors; finetune "
                                     "uses none")
    standardise: bool = flag(False, "linear: standardise every feature with the mean and std of "
                                    "the features trained on (this project's option: one lr then "
                                    "serves encoders whose feature scales differ by orders of "
                                    "magnitude, an untrained one included); off = the authors' raw "
                                    "features")
    # running
    workers: int = flag(min(8, os.cpu_count() or 1), "data-loading processes; 0 loads in the main process")
    device: str = flag("auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    seed: int = flag(0, "seed for the label subset, the noise, the validation split and training")
    results: str = flag("", "JSON-lines file that each run appends to; '' = results.jsonl "
                            "beside the checkpoint (in the current folder for random)")


DEFAULT_BATCH = {"linear": 64, "finetune": 256}  # --batch-size 0; linear: the authors'
EXTRACT_BATCH = 256  # images per forward pass where nothing trains (features, scoring)


def check_args(cfg):
    """Refuse values that cannot work: the flags' own choices and bounds, and their combinations."""
    require(cfg, "label_fraction", lambda v: 0 < v <= 1, "above 0 and at most 1")
    require(cfg, "label_noise", lambda v: 0 <= v < 1, "at least 0 and below 1")
    require(cfg, "val_fraction", lambda v: 0 <= v < 1, "at least 0 and below 1")
    # Adam's first step moves by lr / (1 - 0.9), which must stay a float32 number
    require(cfg, "lr", lambda v: 0 < v <= torch.finfo(torch.float32).max / 10,
            "a positive number up to 3.4e37")
    require(cfg, "weight_decay", lambda v: 0 <= v < math.inf, "0 or more")
    for name in ("img_size", "synthetic_size", "workers", "batch_size"):
        require(cfg, name, lambda v: v >= 0, "0 or more")
    require(cfg, "epochs", lambda v: v >= 1, "at least 1")
    if not cfg.checkpoint:
        raise UsageError("--checkpoint is missing; give a checkpoint.pt that dogo.py wrote, or random")
    if cfg.checkpoint == "random" and cfg.network == "peer":
        raise UsageError("--network peer needs a checkpoint with a peer; --checkpoint random is a "
                         "single encoder")
    if cfg.protocol == "finetune" and cfg.batch_size == 1:  # BatchNorm trains on 2 images or more
        raise UsageError(f"--batch-size must be at least 2 to fine-tune (or 0), got {cfg.batch_size}")


def with_protocol_defaults(cfg):
    """cfg with --batch-size 0 replaced by the protocol's own batch."""
    return dataclasses.replace(cfg, batch_size=cfg.batch_size or DEFAULT_BATCH.get(cfg.protocol, 0))


# ------------------------------------------------------------------------------------------------
# Labels: few and noisy (pure functions of a list, NumPy array or tensor of class indices)
# ------------------------------------------------------------------------------------------------
# Standard asymmetric noise on CIFAR-10 (Patrini et al. 2017): each class is confused with a
# similar-looking one. truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog.
CIFAR10_ASYMMETRIC = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}

# CIFAR-100's 20 superclasses of 5 classes each (Krizhevsky 2009), by fine-class name.
CIFAR100_SUPERCLASSES = {
    "aquatic mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit and vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household electrical devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large man-made outdoor things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large natural outdoor scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large omnivores and herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium-sized mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles 1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles 2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
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
    """Indices of a class-stratified, seeded subset: round(fraction * n_c) of the n_c images of
    each class c, and at least one, so that no class disappears. Returns sorted int64 indices
    (NumPy); the same labels, fraction and seed always give the same subset."""
    labels = _as_numpy(labels)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    kept = [rng.choice(members, size=max(1, round(fraction * len(members))), replace=False)
            for members in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)


def corrupt_labels(labels, rate, num_classes, kind, seed):
    """A noisy copy of `labels` (an int64 NumPy array; the input is left alone), seeded.

    kind 'symmetric': exactly round(rate * N) labels, chosen uniformly, each move to one of the
    other C - 1 classes (C = num_classes), drawn uniformly: the share changed is `rate`. The other
    common convention draws a new label uniformly over all C classes, the true one included, so
    that its effective rate is rate * (C - 1) / C (its 0.8 on CIFAR-10 changes 72% of the labels,
    which is 0.72 here). kind 'asymmetric': in every class c, exactly round(rate * n_c) labels move
    to class (c + 1) mod C. kind may also be a dict {class: class}, such as CIFAR10_ASYMMETRIC or
    CIFAR100_ASYMMETRIC: the same per-class rule for the classes it maps, the other classes are
    left clean."""
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
    choosing the epoch. Every class keeps at least one image to fit on."""
    fit = subsample_labels(labels, 1 - fraction, seed)
    return fit, np.setdiff1d(np.arange(len(_as_numpy(labels))), fit)


# ------------------------------------------------------------------------------------------------
# Encoder
# ------------------------------------------------------------------------------------------------
def load_encoder(cfg):
    """The encoder f to evaluate (the checkpoint's --network, or an untrained one, seeded, for
    'random') and what it is: {arch, feature_dim, img_size, trained_on, step, data_dir,
    synthetic_size, sha256} (sha256: of the checkpoint's bytes that were loaded; None for random)."""
    if cfg.checkpoint == "random":
        torch.manual_seed(cfg.seed)
        arch, dataset = cfg.arch or "resnet18", cfg.dataset or "cifar10"
        img_size = cfg.img_size or dogo.DATASETS[dataset].img_size
        net = dogo.SSLNet(arch, img_size)
        return net.encoder, dict(arch=arch, feature_dim=net.feature_dim, img_size=img_size,
                                 trained_on=None, step=0, data_dir="./data",
                                 synthetic_size=dogo.Config.synthetic_size, sha256=None)
    ckpt, trained, sha256 = dogo.load_checkpoint(cfg.checkpoint, flag="--checkpoint", resume=False)
    if cfg.network == "peer" and ckpt["peer"] is None:
        raise UsageError(f"--network peer: {cfg.checkpoint} was trained alone (--peer none) and has "
                         f"no peer; use --network student")
    student, peer = dogo.build_networks(trained)
    net = student if cfg.network == "student" else peer
    net.load_state_dict(ckpt[cfg.network])  # load_checkpoint has checked every name and shape
    for name, given, own in (("--arch", cfg.arch, net.arch), ("--img-size", cfg.img_size, trained.img_size)):
        if given and given != own:
            raise UsageError(f"{name} {given} differs from the checkpoint's {own}; drop {name}, "
                             f"which is for --checkpoint random")
    info = dict(arch=net.arch, feature_dim=net.feature_dim, img_size=trained.img_size,
                trained_on=trained.dataset, step=ckpt["step"], data_dir=trained.data_dir,
                synthetic_size=trained.synthetic_size, sha256=sha256)
    return net.encoder, info


def evaluation_size(info, dataset):
    """The size the encoder sees the images of `dataset` at: on its training data, its training size; out of
    distribution, that dataset's own size, as the authors' util/test.py resizes to the evaluated dataset's."""
    return info["img_size"] if info["trained_on"] in (None, dataset) else dogo.DATASETS[dataset].img_size


def check_unchanged(module, before):
    """Raise if any tensor of module's state (weights and BatchNorm statistics) differs from
    `before`, a snapshot taken with {k: v.clone() for k, v in module.state_dict().items()}."""
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v.cpu(), before[k].cpu())]
    if changed:
        raise RuntimeError(f"the frozen encoder changed during evaluation: {', '.join(changed[:5])}")


# ------------------------------------------------------------------------------------------------
# Data and features
# ------------------------------------------------------------------------------------------------
class LabelledImages(Dataset):
    """The images of `base` at `indices`, through `transform`, labelled with `labels` (which
    may be a noisy version of the base's own)."""

    def __init__(self, base, indices, labels, transform):
        self.base, self.indices, self.labels, self.transform = base, indices, labels, transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        img, _ = self.base[int(self.indices[i])]
        return self.transform(img), int(self.labels[i])

    @classmethod
    def whole(cls, base, transform):
        """Every image of `base`, with its own label."""
        return cls(base, range(len(base)), dataset_labels(base), transform)


@torch.no_grad()
def extract_features(encoder, dataset, device, batch_size=256, workers=0):
    """Encoder features of every item of a dataset of (image tensor, label), in order: a float32
    (N, feature_dim) tensor and an int64 (N,) tensor, both on the CPU. Eval mode: BatchNorm
    normalises with its running statistics and leaves them as they are."""
    encoder.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda")
    features, labels, done, start = [], [], 0, time.time()
    shown = start
    for x, y in loader:
        features.append(encoder(x.to(device, non_blocking=True)).float().cpu())  # (B, feature_dim)
        labels.append(y.long())
        done += len(y)
        if time.time() - shown > 10 or done == len(dataset):  # a line every 10 s, and at the end
            shown = time.time()
            print(f"features: {done}/{len(dataset)} images, {done / (shown - start):.0f} img/s",
                  flush=True)
    return torch.cat(features), torch.cat(labels)


def cached_features(encoder, splits, cfg, info, device):
    """{split: (features, labels)} of the train and test splits, extracted once and kept beside
    the checkpoint; reused while the checkpoint's bytes, the network and the data stay the same.
    Returns them and whether they came from that cache."""
    path = key = None
    if cfg.checkpoint != "random":  # an untrained encoder is not worth keeping
        path = f"{os.path.splitext(cfg.checkpoint)[0]}.{cfg.network}.{info['dataset']}.features.pt"
        key = dict(checkpoint_sha256=info["sha256"], network=cfg.network, dataset=info["dataset"],
                   img_size=info["eval_size"], data=data_fingerprint(splits, info))
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # none yet, unreadable (an interrupted copy, say), a name too long: extract again
            saved = None
        if isinstance(saved, dict) and saved.get("key") == key:
            print(f"features: reusing {path}")
            return saved["features"], True
        path = path if writable(path, "keep the features in") else None
    # Normalised with the statistics of the data evaluated on: out of distribution, not the training data's.
    transform = dogo.eval_transform(info["eval_size"], info["dataset"])
    features = {}
    for name, data in splits.items():
        print(f"features of the {name} split ({len(data)} images)", flush=True)
        features[name] = extract_features(encoder, LabelledImages.whole(data, transform), device,
                                          EXTRACT_BATCH, cfg.workers)
        require_finite(features[name][0], f"the {name} features of --checkpoint {cfg.checkpoint}", BROKEN)
    if path:
        try:
            with folder_locked(path), dogo.atomic_file(path) as f:
                torch.save({"key": key, "features": features}, f)
        except UsageError as err:  # a full disk: torch reports it as a RuntimeError, atomic_file as this
            print(f"note: the features are not cached: {err}")
    return features, False


@contextlib.contextmanager
def folder_locked(path):
    """Hold the lock of path's folder: evaluations of one checkpoint may run side by side, and each
    rewrites the results file whole, so no two may read and write it, or its temporary file, at once."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def probe(path):
    """Raise OSError unless path can be written whole as dogo.atomic_file writes it (its folder made
    if need be): a folder in its place, a regular file above it, a name too long all fail here."""
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "a folder is there")
    above = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise NotADirectoryError(errno.ENOTDIR, f"{above} is a file, not a folder")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with folder_locked(path):
        with open(path + ".tmp", "wb"):
            pass
        os.remove(path + ".tmp")


def writable(path, purpose):
    """Whether path can be written (see probe); if not, a note says so and the run goes on without it."""
    try:
        probe(path)
        return True
    except OSError as err:
        print(f"note: cannot {purpose} {path} ({err.strerror or err}); going on without it")
        return False


def align_classes(train, test):
    """Number the test split's classes as the training split does, by name: two image folders each number
    their own sorted classes, so a class missing from one would shift every label after it. A test class
    that training lacks is an error; a training class without test images, a warning."""
    if not hasattr(test, "class_to_idx"):  # CIFAR, STL-10, synthetic: one fixed list of classes
        return
    unknown = sorted(set(test.classes) - set(train.classes))
    if unknown:
        raise UsageError(f"the test split has classes that the training split lacks: {', '.join(unknown)}; "
                         f"remove them from the test folder, or add them to train/")
    missing = sorted(set(train.classes) - set(test.classes))
    if missing:
        print(f"warning: no test images of the classes {', '.join(missing)}; they are scored on the others")
    number = [train.class_to_idx[name] for name in test.classes]  # test's index -> training's
    test.samples = test.imgs = [(path, number[label]) for path, label in test.samples]
    test.targets = [label for _, label in test.samples]
    test.classes, test.class_to_idx = train.classes, train.class_to_idx


def data_fingerprint(splits, info):
    """What cached features depend on in the data: the synthetic set's size; for image folders a hash of
    every file's path, label, size and modification time, so that any change extracts again; else the
    folder the dataset was downloaded to."""
    if info["dataset"] == "synthetic":
        return info["synthetic_size"]
    if not all(hasattr(data, "samples") for data in splits.values()):
        return os.path.abspath(info["data_dir"])
    digest = hashlib.sha256()
    for name, data in splits.items():
        for path, label in data.samples:
            stat = os.stat(path)
            digest.update(f"{name}/{os.path.relpath(path, info['data_dir'])}:{label}:{stat.st_size}:"
                          f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def require_finite(values, what, fix):
    """Refuse to go on with non-finite features, losses or scores: a figure made from them would mean
    nothing. fix: what the user can do, for the one line."""
    if not torch.isfinite(torch.as_tensor(values)).all():
        raise UsageError(f"{what} are not finite: {fix}")


BROKEN = "its weights are broken; evaluate an earlier checkpoint, or train again with a lower --lr"


def diverged(cfg):
    """The fix for a classifier or network whose training went non-finite."""
    return f"{cfg.protocol} training diverged at --lr {cfg.lr:g}; give a lower --lr"


# ------------------------------------------------------------------------------------------------
# Protocols
# ------------------------------------------------------------------------------------------------
def topk_accuracy(scores, labels, k):
    """Percentage of rows of scores (N, C) whose true label is among their k highest scores."""
    top = scores.topk(k, dim=1).indices                                 # (N, k)
    return 100.0 * (top == labels[:, None]).any(dim=1).sum().item() / len(labels)


def accuracies(scores, labels, num_classes):
    """{'top1', 'top5'} in percent; top-5 only with 20 classes or more, where it says something."""
    return {"top1": topk_accuracy(scores, labels, 1),
            "top5": topk_accuracy(scores, labels, 5) if num_classes >= 20 else None}


class BestEpoch:
    """Keeps a copy of the weights of the epoch with the best validation accuracy; with no
    validation set, those of the last epoch. A tie goes to the later epoch: small validation
    sets tie often, and the later weights have fitted the training set better."""
    epoch, accuracy, state = 0, None, None

    def update(self, epoch, accuracy, module):
        if accuracy is None or self.accuracy is None or accuracy >= self.accuracy:
            self.epoch, self.accuracy = epoch, accuracy
            self.state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    def restore(self, module):
        module.load_state_dict(self.state)


def standardise(x_fit, *others):
    """Every feature to zero mean and unit variance, with the statistics of x_fit alone (this
    project's --standardise, not the authors' protocol). Raw feature scales differ by orders of
    magnitude between encoders (a random one included), and standardised inputs let one learning
    rate serve them all."""
    mean, std = x_fit.mean(dim=0), x_fit.std(dim=0).clamp_min(1e-6)
    return [(x - mean) / std for x in (x_fit, *others)]


@contextlib.contextmanager
def one_thread_on_cpu(device):
    """Run the block on one CPU thread. A linear classifier's products are too small to gain from
    more, and on a busy machine each one waits for the slowest thread: on 42,500 features of 512
    at batch 64, 10 epochs took 54 s with two threads on two busy cores, 100 epochs 19 s with one."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def train_linear(x_fit, y_fit, x_val, y_val, num_classes, epochs, lr, seed, batch_size,
                 weight_decay=0.0):
    r"""A linear classifier on fixed feature vectors (N, D), trained with Adam on the mean
    cross-entropy of mini-batches. Returns it at its best epoch, chosen on (x_val, y_val) (a tie
    goes to the later epoch; with no validation set, the last), that epoch, and its validation
    top-1 in percent (None without a validation set).

    It computes what this plain loop would, with the same seed and batch order, in a fraction of
    its time (no autograd, no optimiser object, no DataLoader, and nothing that makes the host
    wait for a GPU but the ten progress lines, so the GPU never waits for Python):

        torch.manual_seed(seed)
        classifier = nn.Linear(D, num_classes)
        optimizer = torch.optim.Adam(classifier.parameters(), lr, weight_decay=weight_decay)
        order = torch.Generator().manual_seed(seed)
        for epoch in range(epochs):
            for batch in torch.randperm(N, generator=order).split(batch_size):
                loss = F.cross_entropy(classifier(x_fit[batch]), y_fit[batch])
                optimizer.zero_grad(); loss.backward(); optimizer.step()

    The gradient, written out: with p = softmax(x W^T + b) and one-hot targets Y of a batch of B,

    .. math::
        \nabla_W = \frac{1}{B} (p - Y)^\top x + \lambda W, \qquad
        \nabla_b = \frac{1}{B} (p - Y)^\top \mathbf{1} + \lambda b

    (lambda: weight_decay, the L2 term that torch.optim.Adam adds to the gradient of weight and
    bias), and Adam's step as Kingma & Ba (2015, Algorithm 1 and the remark after it) write it:
    theta -= lr sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps sqrt(1 - beta2^t)),
    which is torch.optim.Adam's update with one pass over the parameters fewer."""
    device, (n, d) = x_fit.device, x_fit.shape
    torch.manual_seed(seed)
    classifier = nn.Linear(d, num_classes).to(device)  # PyTorch's initialisation, as in the loop
    # theta = [W | b] (C, D+1) and features with a column of ones: x W^T + b = [x, 1] theta^T, so
    # weight and bias share each operation below.
    theta = torch.cat([classifier.weight, classifier.bias[:, None]], dim=1)         # (C, D+1)
    theta_t = theta.T                                    # a view: it follows theta's updates
    x_fit, x_val = (torch.cat([x, x.new_ones(len(x), 1)], dim=1) for x in (x_fit, x_val))
    targets = F.one_hot(y_fit, num_classes).to(x_fit.dtype)                         # (N, C)
    grad, m, v = torch.zeros_like(theta), torch.zeros_like(theta), torch.zeros_like(theta)
    beta1, beta2, eps = 0.9, 0.999, 1e-8                 # torch.optim.Adam's defaults
    x_epoch, targets_epoch = torch.empty_like(x_fit), torch.empty_like(targets)
    best_theta, best_epoch = theta.clone(), torch.tensor(epochs, device=device)
    best_correct = torch.tensor(-1, device=device)
    order, t, start, every = torch.Generator().manual_seed(seed), 0, time.time(), max(1, epochs // 10)
    for epoch in range(1, epochs + 1):
        # The epoch's order is drawn on the CPU (the same on every device) and applied to the
        # whole set at once; a batch is then a slice, a view without a copy. Pinned memory lets
        # the copy to a GPU start without waiting for the previous epoch to finish there.
        permutation = torch.randperm(n, generator=order)
        if device.type == "cuda":
            permutation = permutation.pin_memory()
        permutation = permutation.to(device, non_blocking=True)
        torch.index_select(x_fit, 0, permutation, out=x_epoch)                      # (N, D+1)
        torch.index_select(targets, 0, permutation, out=targets_epoch)              # (N, C)
        for i in range(0, n, batch_size):
            x, y = x_epoch[i:i + batch_size], targets_epoch[i:i + batch_size]       # (B, D+1), (B, C)
            error = torch.mm(x, theta_t).softmax(dim=1).sub_(y)                     # (B, C): p - Y
            torch.addmm(theta, error.T, x, beta=weight_decay, alpha=1 / len(x), out=grad)
            t += 1
            m.lerp_(grad, 1 - beta1)                                                # Adam's moments
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
            speed = epoch * n / (time.time() - start)
            print(f"linear epoch {epoch}/{epochs} | loss {loss:.4f} on the training features"
                  + (f" | validation top-1 {100 * correct.item() / len(y_val):.2f}%" if len(y_val) else "")
                  + f" | {speed:,.0f} features/s", flush=True)
    if not len(y_val):
        best_theta = theta
    if not (math.isfinite(loss) and torch.isfinite(best_theta).all()):  # one more wait on the device
        raise UsageError(f"the linear classifier's loss or weights are not finite after {epochs} epochs: "
                         f"training diverged at --lr {lr:g}; give a lower --lr")
    classifier.weight.copy_(best_theta[:, :d])
    classifier.bias.copy_(best_theta[:, d])
    val_top1 = 100 * best_correct.item() / len(y_val) if len(y_val) else None
    return classifier, int(best_epoch), val_top1


def linear_accuracy(train_features, train_labels, test_features, test_labels, num_classes,
                    epochs=100, lr=3e-4, seed=0, batch_size=64, val_fraction=0.15,
                    weight_decay=1e-6, standardise_features=False):
    """Linear evaluation on given features (N, D), with the authors' protocol by default: raw
    features, Adam with lr 3e-4 and weight decay 1e-6, batch 64, 100 epochs, no schedule. Holds out
    a seeded validation share of the training set (stratified by class: this project's choice;
    theirs is a plain random split), trains a linear classifier and tests it at the epoch that
    validates best. Every test feature counts (the authors' test loader drops its last partial
    batch: 9,984 of CIFAR's 10,000 images). standardise_features: this project's option, see
    standardise(). Returns {top1, top5, best_epoch, val_top1, train_images, val_images,
    train_steps}, accuracies in percent."""
    device = train_features.device
    y_train = torch.as_tensor(_as_numpy(train_labels), device=device)
    y_test = torch.as_tensor(_as_numpy(test_labels), device=device)
    fit, val = split_validation(y_train, val_fraction, seed)
    x_fit, x_val, x_test = train_features[fit], train_features[val], test_features
    if standardise_features:
        x_fit, x_val, x_test = standardise(x_fit, x_val, x_test)
    with one_thread_on_cpu(device):
        classifier, best_epoch, val_top1 = train_linear(x_fit, y_train[fit], x_val, y_train[val],
                                                        num_classes, epochs, lr, seed, batch_size,
                                                        weight_decay)
    with torch.no_grad():
        scores = classifier(x_test)
    require_finite(scores, "the linear classifier's test scores", f"give a lower --lr than {lr:g}")
    return {**accuracies(scores, y_test, num_classes), "best_epoch": best_epoch,
            "val_top1": val_top1, "train_images": len(fit), "val_images": len(val),
            "train_steps": epochs * math.ceil(len(fit) / batch_size)}  # train_linear's batches


@torch.no_grad()
def predict(model, images, cfg, device):
    """(scores, labels) of a network over a dataset of (image, label), in eval mode."""
    model.eval()
    scores, labels = [], []
    for x, y in DataLoader(images, batch_size=EXTRACT_BATCH, num_workers=cfg.workers):
        scores.append(model(x.to(device)).float())
        labels.append(y.to(device))
    return torch.cat(scores), torch.cat(labels)


def finetune(encoder, feature_dim, fit_set, val_set, num_classes, cfg, lr, device):
    """The encoder and a new linear head trained together on labelled images, with Adam and a
    cosine learning-rate schedule. Returns the network at its best validation epoch, that
    BestEpoch, and the number of optimiser steps taken."""
    torch.manual_seed(cfg.seed)
    model = nn.Sequential(encoder, nn.Linear(feature_dim, num_classes)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    # Every image in every epoch, the last partial batch included; but BatchNorm cannot train on
    # a batch of one, so a last batch of a single image (a different one each epoch) is dropped.
    loader = DataLoader(fit_set, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.workers,
                        drop_last=len(fit_set) % cfg.batch_size == 1,
                        generator=torch.Generator().manual_seed(cfg.seed))
    # The schedule is stepped every batch, so its period counts batches, not epochs.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * len(loader))
    best, steps = BestEpoch(), 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        start, losses, seen = time.time(), [], 0
        for x, y in loader:
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            seen, steps = seen + len(y), steps + 1
        speed = seen / (time.time() - start)
        require_finite(losses, f"the fine-tuning losses of epoch {epoch}", diverged(cfg))
        val = None
        if len(val_set):
            scores, labels = predict(model, val_set, cfg, device)
            require_finite(scores, f"the validation scores of epoch {epoch}", diverged(cfg))
            val = topk_accuracy(scores, labels, 1)
        best.update(epoch, val, model)
        print(f"finetune epoch {epoch}/{cfg.epochs} | loss {np.mean(losses):.4f}"
              + (f" | validation top-1 {val:.2f}%" if val is not None else "")
              + f" | {speed:.0f} img/s", flush=True)
    best.restore(model)
    return model, best, steps


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def results_path(cfg):
    """The --results file, checked to be writable (and, if it exists, readable: it is rewritten
    with its old lines) before the long computation starts."""
    folder = os.path.dirname(cfg.checkpoint) if cfg.checkpoint != "random" else ""
    path = cfg.results or os.path.join(folder, "results.jsonl")
    try:
        probe(path)
        if os.path.exists(path):
            open(path, "rb").close()
    except OSError as err:
        raise UsageError(f"--results {path}: cannot write there ({err.strerror or err}); "
                         f"give another file") from None
    return path


def append_result(path, result):
    """Add the result's JSON line to the file, rewritten whole: a write that fails (a full disk)
    leaves the file as it was, where appending in place could leave half a line in it."""
    with folder_locked(path):
        try:
            with open(path, "rb") as f:
                old = f.read()
        except FileNotFoundError:
            old = b""
        except OSError as err:
            raise UsageError(f"--results {path}: cannot read it ({err.strerror}); give another "
                             f"file") from None
        if old and not old.endswith(b"\n"):  # a line cut short earlier stays apart from the new one
            old += b"\n"
        with dogo.atomic_file(path) as f:
            f.write(old + (json.dumps(result) + "\n").encode())


def training_labels(labels, num_classes, dataset, cfg):
    """The labelled training set that --label-fraction and --label-noise leave: (indices of the
    kept images, their labels, how many of those are wrong). Test labels stay clean."""
    if num_classes < 2:  # a classifier has nothing to tell apart: 100% would mean nothing
        raise UsageError(f"{dataset} has {num_classes} class: evaluation needs two classes or more")
    kept = subsample_labels(labels, cfg.label_fraction, cfg.seed)
    if cfg.label_noise == 0:
        return kept, labels[kept], 0
    kind = cfg.noise_type
    if kind == "asymmetric":
        kind = ASYMMETRIC_NOISE.get(dataset, kind)  # CIFAR's similar classes, else c -> c + 1
    noisy = corrupt_labels(labels[kept], cfg.label_noise, num_classes, kind, cfg.seed + 1)
    return kept, noisy, int((noisy != labels[kept]).sum())


def training_settings(cfg):
    """The optimisation settings of the result line: {lr, batch_size, weight_decay, standardise},
    None where the protocol has no such setting."""
    if cfg.protocol == "knn":
        return dict(lr=None, batch_size=None, weight_decay=None, standardise=None)
    linear = cfg.protocol == "linear"
    return dict(lr=cfg.lr, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay if linear else 0.0,
                standardise=cfg.standardise if linear else None)


def frozen_protocol(encoder, splits, kept, labels, num_classes, cfg, info, device):
    """linear or knn: the encoder frozen, its features extracted (or read from the cache) once,
    then a classifier on them. Checks that the encoder, BatchNorm statistics included, ends as
    it began. Returns the fields of the result line."""
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    encoder.requires_grad_(False)
    start = time.time()
    features, cached = cached_features(encoder, splits, cfg, info, device)
    feature_seconds, start = time.time() - start, time.time()
    x_train = features["train"][0][kept].to(device)                     # (N_kept, feature_dim)
    x_test, y_test = (t.to(device) for t in features["test"])
    if cfg.protocol == "linear":
        # seed + 2: the validation split is drawn apart from the label subset and the noise
        fields = linear_accuracy(x_train, labels, x_test, y_test, num_classes, cfg.epochs, cfg.lr,
                                 cfg.seed + 2, cfg.batch_size, cfg.val_fraction, cfg.weight_decay,
                                 cfg.standardise)
    else:
        scores = knn_scores(x_train, labels, x_test, num_classes)
        require_finite(scores, f"the kNN scores of --checkpoint {cfg.checkpoint}", BROKEN)
        fields = {**accuracies(scores, y_test, num_classes), "best_epoch": None, "val_top1": None,
                  "train_images": len(kept), "val_images": 0, "train_steps": None}
    check_unchanged(encoder, before)
    return {**fields, "test_images": len(y_test), "feature_seconds": feature_seconds,
            "features_cached": cached, "train_seconds": time.time() - start}


def finetune_protocol(encoder, splits, kept, labels, num_classes, cfg, info, device):
    """finetune: the encoder and a new head trained on augmented labelled images, tested at the
    epoch that validates best. Returns the fields of the result line."""
    start, size = time.time(), info["eval_size"]
    transform = dogo.eval_transform(size, info["dataset"])
    # Standard supervised augmentation; padding after Normalize fills with the mean colour.
    augment = v2.Compose([transform, v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip()])
    fit, val = split_validation(labels, cfg.val_fraction, cfg.seed + 2)  # positions in `kept`
    if len(fit) < 2:  # BatchNorm cannot train on a single image
        raise UsageError(f"--protocol finetune needs two training images or more, and "
                         f"--label-fraction {cfg.label_fraction} leaves {len(fit)}; raise it")
    fit_set = LabelledImages(splits["train"], kept[fit], labels[fit], augment)
    val_set = LabelledImages(splits["train"], kept[val], labels[val], transform)
    model, best, steps = finetune(encoder, info["feature_dim"], fit_set, val_set, num_classes, cfg,
                                  cfg.lr, device)
    scores, y_test = predict(model, LabelledImages.whole(splits["test"], transform), cfg, device)
    require_finite(scores, "the fine-tuned network's test scores", diverged(cfg))
    return {**accuracies(scores, y_test, num_classes), "best_epoch": best.epoch,
            "val_top1": best.accuracy, "train_images": len(fit), "val_images": len(val),
            "train_steps": steps, "test_images": len(y_test), "feature_seconds": None,
            "features_cached": False, "train_seconds": time.time() - start}


def evaluate(cfg):
    """Run one evaluation as cfg describes it; print a summary, append its JSON line to
    --results, and return that line as a dict."""
    check_args(cfg)
    cfg = with_protocol_defaults(cfg)
    device = pick_device(cfg.device)
    encoder, info = load_encoder(cfg)
    out = results_path(cfg)  # after the checkpoint, which names its default folder
    dataset = cfg.dataset or info["trained_on"] or "cifar10"
    info.update(dataset=dataset, data_dir=cfg.data_dir or info["data_dir"],
                synthetic_size=cfg.synthetic_size or info["synthetic_size"],
                eval_size=evaluation_size(info, dataset))
    splits = {s: dogo.load_dataset(info["dataset"], info["data_dir"], s, info["synthetic_size"],
                                   info["eval_size"]) for s in ("train", "test")}
    align_classes(splits["train"], splits["test"])
    all_labels = dataset_labels(splits["train"])
    num_classes = len(getattr(splits["train"], "classes", [])) or int(all_labels.max()) + 1
    kept, labels, wrong = training_labels(all_labels, num_classes, info["dataset"], cfg)
    protocol = finetune_protocol if cfg.protocol == "finetune" else frozen_protocol
    fields = protocol(encoder.to(device), splits, kept, labels, num_classes, cfg, info, device)

    result = {
        "checkpoint": cfg.checkpoint, "checkpoint_sha256": info["sha256"], "step": info["step"],
        "network": cfg.network, "arch": info["arch"], "trained_on": info["trained_on"],
        "dataset": info["dataset"], "img_size": info["eval_size"], "protocol": cfg.protocol,
        "label_fraction": cfg.label_fraction, "label_noise": cfg.label_noise,
        "noise_type": cfg.noise_type, "labels_changed": wrong, "seed": cfg.seed,
        "epochs": None if cfg.protocol == "knn" else cfg.epochs,
        **training_settings(cfg), **fields,
        **dogo.ran_on(device), "date": datetime.datetime.now().isoformat(timespec="seconds"),
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
    chosen = f" at epoch {r['best_epoch']}/{r['epochs']}" if r["best_epoch"] else ""
    chosen += f", chosen on validation ({r['val_top1']:.2f}%)" if r["val_top1"] is not None else ""
    settings = "" if r["lr"] is None else (
        f"  Adam lr {r['lr']:g}, weight decay {r['weight_decay']:g}, batch {r['batch_size']}"
        + {True: ", standardised features", False: ", raw features", None: ""}[r["standardise"]] + "\n")
    cache = " (cached)" if r["features_cached"] else ""
    features = f"features {r['feature_seconds']:.1f} s{cache}, " if r["feature_seconds"] is not None else ""
    steps = f" ({r['train_steps']} steps)" if r["train_steps"] is not None else ""
    print(f"\n{r['protocol']} evaluation of the {r['network']} {r['arch']} of {r['checkpoint']} "
          f"({trained}) on {r['dataset']}\n"
          f"  labels: {r['train_images']} images to train on, {r['val_images']} to validate, "
          f"{r['labels_changed']} of them wrong; {r['test_images']} test images at {r['img_size']} px\n"
          f"{settings}  test top-1 {r['top1']:.2f}%{top5}{chosen}\n"
          f"  time: {features}{r['protocol']} {r['train_seconds']:.1f} s{steps}")


def main(argv=None):
    """The command line; returns the result line as a dict, so that Python can drive it too."""
    try:
        return evaluate(parse_flags(EvalConfig, argv, "eval_linear.py", __doc__.splitlines()[0])[0])
    except UsageError as err:  # dogo.last_line: a loader worker's error arrives with its traceback
        print(f"eval_linear.py: error: {dogo.last_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("eval_linear.py: stopped by Ctrl-C; nothing was recorded", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
