#!/usr/bin/env python3
"""Train the proxy: the exact Dataset297 network, trained here at 3 mm on labelled CTs.

Random stand-in weights put every voxel near a tie, so they cannot judge an approximation. The proxy
is the same architecture and plans (nnU-Net's `build_network_architecture` on our plans.json) trained
on the real example CTs with TotalSegmentator's own `--fast` labels and on generated phantoms with their
analytic labels (seeds disjoint from every evaluation phantom). The recipe follows nnU-Net where it can on
two cores: foreground-oversampled patches, CE + soft Dice (background excluded), poly learning rate, light
intensity augmentation and no mirroring (the real trainer is `NoMirroring`).

    python tools/train_proxy.py                 # the committed recipe -> models/proxy/
    python tools/train_proxy.py --quick         # about a minute: checks the recipe still trains
    python tools/train_proxy.py --measure       # seconds per step: fp32 vs bf16, channels-last

Recipe v2 goes on from v1's weights (sha256 `V1_SHA256`, committed in ef41cf7) for 420 more steps at half the
learning rate, on 24 phantoms drawn with another seed: two hours on two cores hold about 450 steps, so a longer
training is two sessions' steps in a row. `--init DIR` names the folder holding v1 (default models/proxy; once v2
replaces it there: `git show ef41cf7:models/proxy/proxy_fp16.npz` and `...:models/proxy/proxy.json` into DIR).

Resumable: state is saved every few minutes and on Ctrl-C; rerun the same command to go on.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from common.data import phantoms  # noqa: E402
from common.model import weights  # noqa: E402
from common.model.proxy import PROXY_DIR, load_state_dict, read_meta, save_proxy  # noqa: E402
from common.pipeline import preprocess, resample  # noqa: E402
from common.core import io, paths  # noqa: E402

RECIPE_VERSION = 2
V1_SHA256 = "c9a2f437ec620dab7b720fcdff4b92753bd647dd3714b1a596b58d3351510901"
SHARED = paths.shared_data_dir()
# The real CTs and TotalSegmentator's own `--fast` output for them (training fit: they are all we have).
REAL_PAIRS = (("example_ct_sm.nii.gz", "example_seg_fast.nii.gz"),
              ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"))
TRAIN_SEED_BASE = 500_000  # phantom seeds used for training; evaluation phantoms use seeds < 10_000


@dataclass
class Recipe:
    steps: int = 420
    patch: tuple[int, int, int] = (80, 80, 80)
    batch: int = 2
    lr: float = 1e-3
    warmup: int = 10
    weight_decay: float = 3e-5
    foreground_fraction: float = 0.5  # share of patches centred on a random voxel of a random present class
    real_fraction: float = 0.25      # share of patches drawn from the real CTs
    n_phantoms: int = 24
    seed: int = 298
    init_sha256: str = V1_SHA256     # start from the proxy with this sha256 ("" = random init)
    precision: str = "auto"          # auto | bf16 | fp32
    save_every_s: float = 240.0
    version: int = RECIPE_VERSION

    @classmethod
    def quick(cls) -> "Recipe":
        return cls(steps=45, patch=(32, 32, 32), batch=2, lr=3e-3, warmup=5, n_phantoms=4, save_every_s=60.0,
                   init_sha256="")


@dataclass
class Sample:
    name: str
    image: np.ndarray   # float32 (z, y, x), CT-normalized, padded to at least the patch
    labels: np.ndarray  # uint8, same grid
    fg: dict = field(default_factory=dict)  # class -> (n, 3) voxel coordinates (subsampled)


# --------------------------------------------------------------------------- data

def _preprocess(hu: np.ndarray, labels: np.ndarray, affine: np.ndarray, patch) -> tuple[np.ndarray, np.ndarray]:
    """The inference pipeline's steps up to the network (canonical, 3 mm, crop, normalize, pad), labels alike."""
    data, canon_affine, _ = io.to_canonical(hu, affine)
    lab, _, _ = io.to_canonical(labels, affine)
    spacing = resample.header_spacing(data.shape, canon_affine)
    zoom = resample.zoom_factors(spacing)
    image = resample.to_target_spacing(np.asarray(data, np.float64), zoom).transpose(2, 1, 0)
    lab = resample.labels_to_shape(np.asarray(lab), image.shape[::-1]).transpose(2, 1, 0)
    box = preprocess.bbox_slices(preprocess.nonzero_bbox(image))
    image, unpad = preprocess.pad_to_patch(preprocess.normalize_ct(image[box]), patch)
    padded_lab = np.zeros(image.shape, np.uint8)
    padded_lab[unpad] = lab[box]
    return np.ascontiguousarray(image), padded_lab


def _foreground_index(labels: np.ndarray, rng: np.random.Generator, per_class: int = 4000) -> dict:
    out = {}
    for c in np.unique(labels):
        if c == 0:
            continue
        where = np.argwhere(labels == c)
        if len(where) > per_class:
            where = where[rng.choice(len(where), per_class, replace=False)]
        out[int(c)] = where.astype(np.int32)
    return out


def _phantom_spec(i: int, rng: np.random.Generator) -> phantoms.PhantomSpec:
    """A widened phantom: random field of view, spacing, orientation and slab position."""
    sxy = rng.uniform(0.9, 1.6)
    fov = rng.uniform(330, 480)
    nxy = int(fov / sxy)
    sz = float(rng.choice([1.5, 2.0, 2.5, 3.0, 5.0]))
    nz = int(rng.uniform(180, 480) / sz)
    return phantoms.PhantomSpec(f"train_{i:03d}", (nxy, nxy, nz), (sxy, sxy, sz),
                                str(rng.choice(["RAS", "LPS"])), TRAIN_SEED_BASE + i)


def build_dataset(recipe: Recipe, cache: Path, log=print) -> tuple[list[Sample], list[Sample], list[str]]:
    """Phantom and real training samples, cached as .npz in `cache` (the recipe version keys the cache)."""
    from tqdm import tqdm

    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(recipe.seed)
    jobs = [("phantom", _phantom_spec(i, rng)) for i in range(recipe.n_phantoms)]
    jobs += [("real", pair) for pair in REAL_PAIRS if (SHARED / pair[0]).exists()]
    if not any(kind == "real" for kind, _ in jobs):
        log(f"note: no real CTs under {SHARED}; training on phantoms only")
    synth, real, names = [], [], []
    for kind, job in tqdm(jobs, desc="training data", unit="case", disable=None):
        name = job.case_id if kind == "phantom" else job[0].split(".")[0]
        key = f"v{recipe.version}-p{'x'.join(map(str, recipe.patch))}-{name}"
        path = cache / f"{key}.npz"
        if path.exists():
            with np.load(path) as z:
                image, labels = z["image"], z["labels"]
        else:
            if kind == "phantom":
                hu, lab, affine = phantoms.make_phantom(job.shape, job.spacing, job.orientation, job.seed,
                                                        noise_sd=float(rng.uniform(6, 25)))
                names.append(f"phantom seed {job.seed} {job.shape} @ {job.spacing} mm {job.orientation}")
            else:
                img = io.validate_nifti(SHARED / job[0])
                hu = img.get_fdata()
                lab = np.asarray(io.validate_nifti(SHARED / job[1]).dataobj).astype(np.uint8)
                affine = img.affine
            image, labels = _preprocess(hu, lab, affine, recipe.patch)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, image=image, labels=labels)
            os.replace(tmp, path)
        if kind == "phantom":
            names.append(f"phantom {job.case_id}: seed {job.seed}, {job.shape} at {job.spacing} mm, {job.orientation}")
        else:
            names.append(f"real CT ../shared/data/{job[0]} with TotalSegmentator --fast labels {job[1]}")
        sample = Sample(name, image, labels, _foreground_index(labels, rng))
        (synth if kind == "phantom" else real).append(sample)
    names = [n for n in names if not n.startswith("phantom seed")]
    return synth, real, names


def sample_patch(s: Sample, patch, rng: np.random.Generator, foreground: bool):
    shape = np.array(s.image.shape)
    p = np.array(patch)
    if foreground and s.fg:
        cls = rng.choice(list(s.fg))
        centre = s.fg[cls][rng.integers(len(s.fg[cls]))]
        lo = np.clip(centre - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, shape - p)
    else:
        lo = np.array([rng.integers(0, max(n - q, 0) + 1) for n, q in zip(shape, p)])
    sl = tuple(slice(int(a), int(a + q)) for a, q in zip(lo, p))
    return s.image[sl], s.labels[sl]


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light intensity augmentation (nnU-Net's brightness/contrast/noise, no spatial mirroring)."""
    image = image.copy()
    if rng.random() < 0.15:
        image *= rng.uniform(0.9, 1.1)
    if rng.random() < 0.15:
        mean = image.mean()
        image = (image - mean) * rng.uniform(0.85, 1.15) + mean
    if rng.random() < 0.1:
        image += rng.normal(0, rng.uniform(0, 0.05), image.shape).astype(np.float32)
    return image


def make_batch(synth, real, recipe: Recipe, rng: np.random.Generator):
    images, labels = [], []
    for b in range(recipe.batch):
        pool = real if real and rng.random() < recipe.real_fraction else synth
        s = pool[rng.integers(len(pool))]
        fg = rng.random() < recipe.foreground_fraction
        img, lab = sample_patch(s, recipe.patch, rng, fg)
        images.append(augment(img, rng))
        labels.append(lab)
    return np.stack(images)[:, None], np.stack(labels).astype(np.int64)


# --------------------------------------------------------------------------- loss, schedule, precision

def ce_dice_loss(logits, target, n_classes: int):
    """nnU-Net's DC_and_CE_loss: cross-entropy + (1 - soft Dice over the foreground classes), per sample."""
    import torch
    import torch.nn.functional as F

    logits = logits.float()
    ce = F.cross_entropy(logits, target)
    probs = torch.softmax(logits, 1)[:, 1:]
    onehot = F.one_hot(target, n_classes).movedim(-1, 1)[:, 1:].to(probs.dtype)
    axes = (2, 3, 4)
    intersect = (probs * onehot).sum(axes)
    denom = probs.sum(axes) + onehot.sum(axes)
    dice = (2 * intersect + 1e-5) / (denom + 1e-5).clamp_min(1e-8)
    return ce + (1 - dice.mean()), ce.detach(), dice.mean().detach()


def poly_lr(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    return recipe.lr * (1 - step / recipe.steps) ** 0.9


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def choose_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    return "bf16" if cpu_flags() & {"amx_bf16", "avx512_bf16"} else "fp32"


def build_model(seed: int, init_sha256: str = "", init_dir: Path | None = None):
    """The Dataset297 network: seeded random init, or the proxy whose sha256 the recipe names."""
    import torch

    torch.manual_seed(seed)
    net = weights.build_network()
    if init_sha256:
        folder = Path(init_dir or PROXY_DIR)
        meta = read_meta(folder) or {}
        if meta.get("sha256") != init_sha256:
            raise SystemExit(f"error: this recipe starts from the proxy with sha256 {init_sha256[:16]}..., but {folder} "
                             f"holds {str(meta.get('sha256'))[:16]}...; pass --init with a folder holding it "
                             "(see this script's help)")
        state, _ = load_state_dict(folder)
        net.load_state_dict(state)
    return net.to(memory_format=torch.channels_last_3d)


def train_step(net, optimizer, x, y, precision: str):
    import torch

    x = torch.from_numpy(x).contiguous(memory_format=torch.channels_last_3d)
    y = torch.from_numpy(y)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = net(x)
    loss, ce, dice = ce_dice_loss(logits, y, weights.NUM_CLASSES)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
    optimizer.step()
    return float(loss.detach()), float(ce), float(dice)


# --------------------------------------------------------------------------- state

def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_losses(history: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([h["step"] for h in history])
    loss = np.array([h["loss"] for h in history])
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.plot(steps, loss, lw=0.6, alpha=0.35, color="tab:blue", label="loss per step")
    if len(loss) >= 20:
        k = max(5, len(loss) // 40)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, color="tab:blue", label=f"mean of {k} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("CE + (1 - Dice)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def train(recipe: Recipe, work: Path, out: Path | None, threads: int, log=print, init_dir: Path | None = None) -> dict:
    """Train (or resume) `recipe`; write the fp16 proxy to `out` (None: only report the losses)."""
    import torch
    from tqdm import tqdm

    torch.set_num_threads(threads)
    precision = choose_precision(recipe.precision)
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "state.pt"
    synth, real, data_list = build_dataset(recipe, work / "cache", log)
    net = build_model(recipe.seed, "" if state_path.exists() else recipe.init_sha256, init_dir)
    optimizer = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    rng = np.random.default_rng(recipe.seed + 1)
    step, history, wall = 0, [], 0.0
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["recipe"] != asdict(recipe):
            raise SystemExit(f"error: {state_path} was saved by another recipe; delete {work} to start over")
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        step, history, wall = state["step"], state["history"], state["wall_s"]
        log(f"resuming at step {step}/{recipe.steps} ({wall / 60:.1f} min trained)")

    def save_state():
        _atomic_torch_save({"recipe": asdict(recipe), "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                            "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "step": step,
                            "history": history, "wall_s": wall}, state_path)
        plot_losses(history, work / "loss_curve.png", f"proxy recipe v{recipe.version} (in progress)")

    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    net.train()
    last_save = time.monotonic()
    bar = tqdm(total=recipe.steps, initial=step, desc=f"training ({precision})", unit="step", disable=None)
    try:
        while step < recipe.steps and not interrupted:
            for group in optimizer.param_groups:
                group["lr"] = poly_lr(step, recipe)
            x, y = make_batch(synth, real, recipe, rng)
            t0 = time.perf_counter()
            loss, ce, dice = train_step(net, optimizer, x, y, precision)
            wall += time.perf_counter() - t0
            if not math.isfinite(loss):
                raise SystemExit(f"error: loss became {loss} at step {step}; lower --lr")
            step += 1
            history.append({"step": step, "loss": loss, "ce": ce, "dice": dice, "lr": optimizer.param_groups[0]["lr"]})
            recent = history[-20:]
            bar.set_postfix(loss=f"{np.mean([h['loss'] for h in recent]):.3f}",
                            dice=f"{np.mean([h['dice'] for h in recent]):.3f}")
            bar.update(1)
            if time.monotonic() - last_save > recipe.save_every_s:
                save_state()
                last_save = time.monotonic()
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)
        save_state()
    if interrupted:
        log(f"interrupted: state saved at step {step}/{recipe.steps} in {state_path}; rerun the same command to resume")
        raise SystemExit(130)

    first = float(np.mean([h["loss"] for h in history[:10]]))
    last = float(np.mean([h["loss"] for h in history[-10:]]))
    summary = {
        "recipe_version": recipe.version, "recipe": asdict(recipe), "precision": precision, "steps": step,
        "train_wall_s": round(wall, 1), "cpu": cpu_model(), "threads": threads, "torch": torch.__version__,
        "loss_first10": round(first, 4), "loss_last10": round(last, 4),
        "ce_last10": round(float(np.mean([h["ce"] for h in history[-10:]])), 4),
        "dice_last10": round(float(np.mean([h["dice"] for h in history[-10:]])), 4),
        "training_data": data_list,
    }
    if recipe.init_sha256:
        before = read_meta(init_dir or PROXY_DIR) or {}
        if before.get("sha256") == recipe.init_sha256:
            summary["started_from"] = {k: before.get(k) for k in ("sha256", "recipe_version", "steps", "train_wall_s")}
            summary["steps_total"] = step + int(before.get("steps_total") or before.get("steps") or 0)
            summary["train_wall_s_total"] = round(wall + float(before.get("train_wall_s_total")
                                                               or before.get("train_wall_s") or 0), 1)
    with open(work / "losses.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    if out is not None:
        plot_losses(history, out / "loss_curve.png",
                    f"proxy v{recipe.version}: {step} steps, {recipe.patch} x {recipe.batch}, {precision}")
        summary["sha256"] = save_proxy(net.state_dict(), summary, out)
        log(f"proxy written to {out} (sha256 {summary['sha256'][:16]})")
    return summary


def measure(threads: int, steps: int = 3, log=print) -> list[dict]:
    """Seconds per training step for a few patch sizes, fp32 vs bf16 autocast, on this CPU."""
    import torch

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    rows = []
    for patch, batch in (((64, 64, 64), 2), ((80, 80, 80), 2), ((112, 112, 128), 1)):
        for precision in ("fp32", "bf16"):
            if precision == "bf16" and not cpu_flags() & {"amx_bf16", "avx512_bf16"}:
                continue
            net = build_model(0)
            opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
            x = rng.standard_normal((batch, 1, *patch)).astype(np.float32)
            y = rng.integers(0, weights.NUM_CLASSES, (batch, *patch))
            train_step(net, opt, x, y, precision)  # warm-up
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(net, opt, x, y, precision)
            sec = (time.perf_counter() - t0) / steps
            row = {"patch": "x".join(map(str, patch)), "batch": batch, "precision": precision,
                   "s_per_step": round(sec, 2), "voxels_per_s": int(batch * np.prod(patch) / sec)}
            log(json.dumps(row))
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="a <= 2-minute run (4 phantoms, 32^3 patches, 45 steps) that checks the loss falls; "
                             "writes nothing under models/")
    parser.add_argument("--measure", action="store_true", help="time one training step per patch size and precision")
    parser.add_argument("--steps", type=int, help="override the recipe's step count")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 autocast where the CPU has AMX or AVX-512 bf16, else fp32")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads (default: CPUs in the affinity mask)")
    parser.add_argument("--work", type=Path, help="state, data cache and logs (default .cache/proxy_train[_quick])")
    parser.add_argument("--init", type=Path, help="folder holding the proxy the recipe starts from (default models/proxy)")
    parser.add_argument("--out", type=Path, help=f"where the proxy goes (default {PROXY_DIR.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    if args.measure:
        measure(args.threads)
        return 0
    recipe = Recipe.quick() if args.quick else Recipe()
    recipe.precision = args.precision
    if args.steps:
        recipe.steps = args.steps
    work = args.work or ROOT / ".cache" / ("proxy_train_quick" if args.quick else "proxy_train")
    out = args.out if args.out else (None if args.quick else PROXY_DIR)
    summary = train(recipe, work, out, args.threads, init_dir=args.init)
    ratio = summary["loss_last10"] / summary["loss_first10"]
    print(f"loss {summary['loss_first10']:.3f} -> {summary['loss_last10']:.3f} (x{ratio:.2f}) in {summary['steps']} "
          f"steps, {summary['train_wall_s'] / 60:.1f} min ({summary['precision']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
