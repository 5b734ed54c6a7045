"""How dogo.py and eval_linear.py run, as opposed to what they compute: command-line flags;
devices and processes (torchrun), with the all-gather that lets the losses see the global batch
and the order of the images; Ctrl-C, the metrics log and its plot, timings; the synthetic
dataset for offline runs; SimCLR's augmentations batched on the training device.

Nothing here is DoGo: dogo.py holds the method, top to bottom, and imports these helpers.
"""
import argparse
import csv
import dataclasses
import itertools
import math
import os
import resource
import signal
import sys
import time
from dataclasses import field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler


# ------------------------------------------------------------------------------------------------
# Flags: a config dataclass becomes the command line
# ------------------------------------------------------------------------------------------------
class UsageError(Exception):
    """A problem the user can fix (a flag, a path, missing data): reported as one line, exit 2."""


def flag(default, help, choices=None, **bounds):
    """A config field: its default, its documentation (the flag's help) and its valid values:
    choices, or bounds among at_least, above, at_most, below."""
    return field(default=default, metadata=dict(help=help, choices=choices, bounds=bounds))


def parse_flags(config_class, argv=None, prog="dogo.py"):
    """An instance of a config dataclass from command-line flags, and the names of the flags
    actually given. The flags are generated from the fields: each flag's help is the field's
    documentation."""

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line naming the problem, no usage dump
            raise UsageError(f"{message} (see python {prog} --help)")

    # SUPPRESS: flags not given stay out of the namespace, so that --resume can tell them apart.
    parser = Parser(prog=prog, description=sys.modules[config_class.__module__].__doc__.split("\n")[0],
                    argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(config_class):
        choices = f.metadata["choices"]
        choices = f" ({' | '.join(c or repr(c) for c in choices)})" if choices else ""
        default = "" if f.default is None else f" (default: {f.default!r})"  # None: told in the help
        kind = (dict(action=argparse.BooleanOptionalAction) if f.type is bool  # --amp and --no-amp
                else dict(type=f.type, metavar=f.type.__name__.upper()))
        parser.add_argument("--" + f.name.replace("_", "-"), help=f.metadata["help"] + choices + default, **kind)
    given = vars(parser.parse_args(argv))
    return config_class(**given), set(given)


def workers_flag():
    """--workers, the same for every script."""
    return flag(min(8, os.cpu_count() or 1), "data-loading processes (this machine's cores, up to 8); "
                "0 loads in the main process", at_least=0)


def device_flag():
    """--device, the same for every script."""
    return flag("auto", "auto (CUDA when present, else CPU) | cpu | cuda | cuda:N")


BOUNDS = {"at_least": (float.__ge__, "at least"), "above": (float.__gt__, "above"),
          "at_most": (float.__le__, "at most"), "below": (float.__lt__, "below")}


def check_flags(cfg):
    """Refuse values outside a config's choices and bounds, naming the flag and what it takes."""
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        choices = f.metadata["choices"]
        if choices and value not in choices:
            raise UsageError(f"{name} {value!r} is unknown; choose one of "
                             f"{', '.join(c or repr(c) for c in choices)}")
        for bound, limit in f.metadata["bounds"].items():
            holds, words = BOUNDS[bound]
            if not holds(float(value), float(limit)):
                raise UsageError(f"{name} must be {words} {limit}, got {value}")


# ------------------------------------------------------------------------------------------------
# Devices and processes
#
# Under torchrun each process holds N / world of the batch's images. The losses gather every
# process's projections, so that each anchor still meets all 2N - 2 negatives of the global
# batch, and return the same value, with the same gradients for this process's rows, as one
# process holding the whole batch would. Without torchrun the gathers do nothing.
# ------------------------------------------------------------------------------------------------
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
    """(rank, world size, device). torchrun starts the processes and tells each its RANK,
    LOCAL_RANK and WORLD_SIZE; they join one process group: NCCL between GPUs (one GPU per
    process), gloo on CPU. A plain `python dogo.py` is process 0 of 1."""
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


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


class GatherWithGrad(torch.autograd.Function):
    """all_gather that carries gradients back: every process's rows, stacked in rank order."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        # Every process's loss reaches this process's rows: their gradient is the sum of the
        # gradients that all processes computed for them.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather(x):
    """(n, ...) on each process -> (world * n, ...), this process's rows at rank * n."""
    return GatherWithGrad.apply(x) if dist.is_initialized() else x


def summed_over_processes(part):
    """A loss from its per-process parts: the value is the sum over processes; the gradient is
    this part's own, which through `gather` already holds every part's dependence on this
    process's rows."""
    if not dist.is_initialized():
        return part
    total = part.detach().clone()
    dist.all_reduce(total)
    return part + (total - part.detach())


def any_process(value, device):
    """True on every process when it is True on one: all must stop at the same step."""
    if not dist.is_initialized():
        return value
    value = torch.tensor(float(value), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value)


class EpochOrder(DistributedSampler):
    """This process's share of each epoch's order, which (seed, epoch) fix. Process r of W takes
    positions r, r + W, r + 2W, ...: the k-th batches of all processes together hold the images of
    the k-th batch of one process, so the global batches do not depend on W. start(epoch, skip)
    skips the first images of this share, those that a resumed run has already trained on."""

    def __init__(self, data, seed, rank=0, world=1):
        super().__init__(data, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def start(self, epoch, skip=0):
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return super().__len__() - self.skip


# ------------------------------------------------------------------------------------------------
# Ctrl-C, the metrics log and its plot, timings
# ------------------------------------------------------------------------------------------------
def ignore_ctrl_c(worker_id):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle


class StopOnCtrlC:
    """First Ctrl-C: finish the current step, save, and exit. A second Ctrl-C aborts at once.
    quiet: say nothing (under torchrun, every process gets the Ctrl-C; process 0 speaks)."""
    requested = False

    def __init__(self, quiet=False):
        self.quiet = quiet

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


class Progress:
    """Averages the loss terms over each --log-every interval; prints one line per interval and
    keeps the same numbers as the rows of metrics.csv, rewritten whole (and atomically) each time."""

    def __init__(self, csv_path, rows, batch_size, total_steps, epochs):
        self.csv_path, self.rows, self.batch_size = csv_path, rows, batch_size
        self.total_steps, self.epochs = total_steps, epochs
        self.sums, self.count, self.tick = {}, 0, time.time()

    def add(self, terms):
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def log(self, epoch, step):
        speed = self.count * self.batch_size / (time.time() - self.tick)
        self.rows.append({"epoch": epoch, "step": step, **{k: v / self.count for k, v in self.sums.items()},
                          "images_per_s": speed})
        with open(self.csv_path + ".tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[-1]))
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(self.csv_path + ".tmp", self.csv_path)
        eta = (self.total_steps - step) * self.batch_size / speed
        terms = " ".join(f"{k} {v / self.count:.4f}" for k, v in self.sums.items())
        print(f"epoch {epoch}/{self.epochs} step {step}/{self.total_steps} | {terms} | "
              f"{speed:.1f} img/s | eta {eta // 3600:.0f}h{eta % 3600 // 60:02.0f}m", flush=True)
        self.sums, self.count, self.tick = {}, 0, time.time()


def read_metrics(csv_path, until_step):
    """The rows of metrics.csv up to until_step: a resumed run drops the rows logged after its
    checkpoint (steps that a crash lost); a new run (step 0) starts with none."""
    if until_step == 0 or not os.path.exists(csv_path):
        return []
    with open(csv_path, newline="") as f:
        return [r for r in csv.DictReader(f) if int(r["step"]) <= until_step]


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


def time_calls(fn, calls, warmup, device):
    """Mean milliseconds of `calls` calls of fn, after `warmup` untimed ones that absorb the
    one-time costs (cuDNN's kernel search, torch.compile, the loader's start)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None  # GPUs run asynchronously
    for _ in range(warmup):
        fn()
    sync()
    tick = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - tick) / calls * 1000


def peak_memory_mb(device):
    """The GPU's peak allocated memory; on CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ------------------------------------------------------------------------------------------------
# Offline data
# ------------------------------------------------------------------------------------------------
class SyntheticShapes(Dataset):
    """A small labelled image dataset made in memory, deterministic for a given split and size.

    Ten classes: five shapes (disk, square, triangle, ring, cross) and five textures (horizontal,
    vertical and diagonal stripes, checkerboard, dots), each under a random foreground and
    background colour, position, scale (or period) and a little pixel noise. A network has to
    learn shape and texture, since colour and position carry no information about the class.
    Items are (uint8 tensor 3 x S x S, label), as torchvision datasets give (PIL image, label).
    """
    classes = ("disk", "square", "triangle", "ring", "cross",
               "hstripes", "vstripes", "diagonal", "checker", "dots")

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
        masks = [
            dx ** 2 + dy ** 2 < r ** 2,                                          # disk
            np.maximum(abs(dx), abs(dy)) < r * 0.8,                              # square
            (dy < r * 0.7) & (dy > 2 * abs(dx) - r),                             # triangle
            abs(np.sqrt(dx ** 2 + dy ** 2) - r * 0.8) < r * 0.25,                # ring
            (np.minimum(abs(dx), abs(dy)) < r * 0.3) & (np.maximum(abs(dx), abs(dy)) < r),  # cross
            (y / period + phase) % 1 < 0.5,                                      # hstripes
            (x / period + phase) % 1 < 0.5,                                      # vstripes
            ((x + y) / period + phase) % 1 < 0.5,                                # diagonal
            ((x / period + phase) % 1 < 0.5) ^ ((y / period + phase) % 1 < 0.5),  # checker
            ((x / period + phase) % 1 - 0.5) ** 2 + ((y / period + phase) % 1 - 0.5) ** 2 < 0.09,
        ]
        fg, bg = rng.uniform(0, 1, size=(2, 3, 1, 1))
        bg = np.where(abs(fg - bg) < 0.3, 1 - fg, bg)    # keep foreground and background apart
        img = np.where(masks[label], fg, bg) + rng.normal(0, 0.03, size=(3, s, s))
        return (np.clip(img, 0, 1) * 255).astype(np.uint8)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


# ------------------------------------------------------------------------------------------------
# Augmentations on the device, a batch at a time (--gpu-augment)
#
# The SimCLR augmentation of dogo.py's ssl_augmentation, batched: the same steps and distributions
# as the per-image torchvision v2 pipeline, run on the batch's own device, with every image drawing its
# own crop, flip, jitter factors and order, grayscale and blur. All randomness comes from torch.rand
# with `generator`: seeded, it makes the output reproducible; it must live on the images' device.
# ------------------------------------------------------------------------------------------------
def random_resized_crop_flip(x, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """RandomResizedCrop + RandomHorizontalFlip, float (B, C, H, W) -> (B, C, size, size). Like
    torchvision, each image tries 10 (area, aspect ratio) draws and keeps the first integer box that
    fits in the image: we draw all 10 at once and find the first fit with argmax."""
    B, _, H, W = x.shape
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=x.device)
    u = rand(B, 10, 2)
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])  # log-uniform aspect ratio
    w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (w >= 1) & (w <= W) & (h >= 1) & (h <= H)
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first box that fits
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    # No fit in 10 tries: central crop of the whole image, clamped to the allowed aspect ratios.
    ok = fits.any(dim=1)
    w = torch.where(ok, w, round(H * ratio[1]) if W / H > ratio[1] else W)
    h = torch.where(ok, h, round(W / ratio[0]) if W / H < ratio[0] else H)
    # Top-left corner uniform over the integer positions (torch.randint in torchvision).
    pos = rand(B, 2)
    left = torch.where(ok, torch.floor(pos[:, 0] * (W - w + 1)), (W - w) // 2)
    top = torch.where(ok, torch.floor(pos[:, 1] * (H - h + 1)), (H - h) // 2)
    # Bilinear resize of the box, torchvision's half-pixel convention: output pixel i reads input
    # x = left + (i + 0.5) * w / size - 0.5, clamped to the box (as if the crop were cut out first).
    centres = (torch.arange(size, device=x.device) + 0.5) / size
    xs = (left[:, None] + centres * w[:, None] - 0.5).clamp(left[:, None], (left + w - 1)[:, None])
    ys = (top[:, None] + centres * h[:, None] - 0.5).clamp(top[:, None], (top + h - 1)[:, None])
    flip = rand(B, 1) < 0.5
    xs = torch.where(flip, xs.flip(1), xs)  # horizontal flip = read the columns right to left
    # grid_sample wants (x, y) in [-1, 1], -1 and 1 the outer pixel edges (align_corners=False).
    grid = torch.stack(torch.broadcast_tensors((2 * xs[:, None, :] + 1) / W - 1,
                                               (2 * ys[:, :, None] + 1) / H - 1), dim=-1)
    # Plain bilinear: torchvision antialiases when it shrinks a crop, a small change at these
    # sizes (and none for CIFAR, whose crops are only ever enlarged).
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


def color_jitter_grayscale(x, jitter=(0.8, 0.8, 0.8, 0.2), p_jitter=0.8, p_gray=0.2, generator=None):
    """RandomApply(ColorJitter(*jitter), p=p_jitter) then RandomGrayscale(p=p_gray), jitter <= 1."""
    B = x.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=x.device)
    # Brightness, contrast, saturation factors ~ U[1 - j, 1 + j] (a 4th, unused, keeps indexing simple).
    factors = 1 + torch.tensor([*jitter[:3], 0.0], device=x.device) * (2 * rand(B, 4) - 1)
    hue = jitter[3] * (2 * rand(B, 1, 1) - 1)  # in turns, ~ U[-j, j]
    order = rand(B, 4).argsort(dim=1)  # a random permutation per image
    out = x
    for step in range(4):
        op = order[:, step].view(B, 1, 1, 1)  # 0 brightness, 1 contrast, 2 saturation, 3 hue
        # The first three blend the image with a reference: black, the mean gray level, the gray image.
        gray = _gray(out)
        ref = torch.where(op == 0, 0.0, torch.where(op == 1, gray.mean((2, 3), keepdim=True), gray))
        f = factors.gather(1, order[:, step:step + 1]).view(B, 1, 1, 1)
        new = torch.lerp(ref, out, f).clamp(0, 1)  # f * out + (1 - f) * ref, clamped as in torchvision
        # Hue is the costly step: convert just the images whose turn it is (on a GPU the boolean
        # indexing costs a sync, cheaper than shifting the hue of every image four times).
        is_hue = order[:, step] == 3
        new[is_hue] = _shift_hue(out[is_hue], hue[is_hue])
        out = new
    out = torch.where(rand(B, 1, 1, 1) < p_jitter, out, x)
    return torch.where(rand(B, 1, 1, 1) < p_gray, _gray(out).expand_as(out), out)


def _random_blur(x, kernel_size, generator=None):
    """With p=0.5 per image, a Gaussian blur with its own sigma ~ U[0.1, 2], reflect padding."""
    B, C, H, W = x.shape
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=x.device)
    sigma = 0.1 + 1.9 * rand(B, 1)
    t = torch.arange(kernel_size, device=x.device) - kernel_size // 2
    kernel = torch.softmax(-0.5 * (t / sigma) ** 2, dim=1).repeat_interleave(C, dim=0)  # (B*C, K)
    # One depthwise conv over all B*C channels applies every image's own kernel; the 2D Gaussian
    # is separable: a vertical then a horizontal pass.
    y = F.pad(x.reshape(1, B * C, H, W), [kernel_size // 2] * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(B * C, 1, kernel_size, 1), groups=B * C)
    y = F.conv2d(y, kernel.view(B * C, 1, 1, kernel_size), groups=B * C).view(B, C, H, W)
    return torch.where(rand(B, 1, 1, 1) < 0.5, y, x)


def batch_ssl_augmentation(images, img_size, mean, std, generator=None):
    """images: (B, 3, H, W) uint8 (or float in [0,1]) on any device; returns (B, 3, img_size, img_size)
    float32, normalised with mean/std, each image with its own random draw."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    x = random_resized_crop_flip(x, img_size, generator=generator)
    x = color_jitter_grayscale(x, generator=generator)
    if img_size >= 64:
        x = _random_blur(x, int(0.1 * img_size) // 2 * 2 + 1, generator=generator)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (mean, std))
    return (x - mean) / std
