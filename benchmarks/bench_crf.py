"""Dense CRF: the `pydensecrf2` reference against the PyTorch backend, on the same images in the same run.

STEGO's CRF (METHODS 0.7: 10 mean-field iterations, Gaussian sxy 1 / compat 3, bilateral sxy 67 / srgb 3 /
compat 4) on batches of real CamVid val images (``../shared/data/camvid11``) at 320x320 (the evaluation
protocol's crop: shorter side to 320, centre crop) and at CamVid's full 480x360. For each size and each torch
thread count one table row: per-image wall time of each backend (median of the repeats, the backends
interleaved), the speed-up (reference time / torch time), the CPU time per image of each (all threads), and how
far the torch marginals are from the reference (fraction of pixels whose argmax matches, mean and max |dQ|).

The logits come from a fitted model when ``--model`` names one (its cluster log-probabilities, flip TTA, as
``hf-useg evaluate`` computes them); otherwise from a deterministic proxy (said so in the output): distances of
each 8x8 block's mean colour to 27 fixed colours, i.e. logits at ViT-8 patch resolution that follow the image's
regions. ``--miou`` (needs ``--model``) also scores the model's clusters on all of CamVid val with no CRF and
with each backend (Hungarian matching, the protocol's 320x320 crops). Without CamVid the timing runs on
synthetic images and agreement is reported for them; without ``pydensecrf`` (e.g. on the GPU machine) the torch
backend is timed alone; ``--small`` shrinks everything to CI size.

    python benchmarks/bench_crf.py                                   # CamVid val, 8 images, 1 and all threads
    python benchmarks/bench_crf.py --threads 1,2,4                   # a thread sweep of the torch backend
    python benchmarks/bench_crf.py --model outputs/km-camvid/model --miou
    python benchmarks/bench_crf.py --device cuda                     # the torch backend on the GPU
    python benchmarks/bench_crf.py --small                           # seconds: 2 small images, 1 repeat
    python benchmarks/bench_crf.py --workers 2                       # also the reference in 2 processes

pydensecrf runs on one core. The torch backend on CPU runs the batch's images in ``torch.get_num_threads()``
worker threads (one image per thread at a time; see `hf_useg.crf.dense_crf_batch`), so its default uses every
core; ``--threads 1`` compares core for core. Other busy processes slow both: the header and footer print the load
average, and the CPU-time columns show the work apart from the waiting.

A model for ``--model`` (offline: the backbone is randomly initialised, cluster mIoU ~13% on CamVid val; with
the Hub use ``training/configs/dino_kmeans_camvid.yaml`` as it is):

    python training/train.py --config training/configs/dino_kmeans_camvid.yaml --backbone random-vit-small-8 \\
        --output_dir outputs/km-camvid
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hf_useg.crf import denormalize_to_uint8, dense_crf_batch, shutdown_crf_workers

CAMVID = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "camvid11"
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def synthetic_batch(num_images: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients with a few flat rectangles and pixel noise, like a photo's regions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    images = []
    for _ in range(num_images):
        a, b, c = rng.uniform(40, 215, 3)
        image = np.stack([a + 40 * xx, b + 40 * yy, c + 40 * (xx - yy)], axis=-1)
        for _ in range(4):
            top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
            bottom, right = top + rng.integers(height // 8, height // 2), left + rng.integers(width // 8, width // 2)
            image[top:bottom, left:right] = rng.uniform(0, 255, 3)
        images.append(np.clip(image + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8))
    return np.stack(images)


def camvid_batch(root: Path, num_images: int, crop: int | None) -> np.ndarray:
    """The first val images, full size or (crop) shorter side resized to `crop` (nearest, as the evaluation
    protocol's processor) and centre-cropped to `crop` x `crop`."""
    names = (root / "splits" / "val.txt").read_text().split()[:num_images]
    images = []
    for name in names:
        image = Image.open(root / "images" / "val" / f"{name}.webp").convert("RGB")
        if crop is not None:
            scale = crop / min(image.size)
            size = (max(crop, round(image.width * scale)), max(crop, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.NEAREST)
            left, top = (image.width - crop) // 2, (image.height - crop) // 2
            image = image.crop((left, top, left + crop, top + crop))
        images.append(np.asarray(image))
    return np.stack(images)


def proxy_logits(images: np.ndarray, num_classes: int = 27, seed: int = 0) -> torch.Tensor:
    """Deterministic stand-in for a model: -|block colour - c_k|^2 / (2 * 20^2) over fixed colours c_k, on
    8x8 blocks (ViT-8 patch resolution)."""
    colours = torch.from_numpy(np.random.default_rng(seed).uniform(0, 255, (num_classes, 3))).float()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    blocks = F.avg_pool2d(x, 8, ceil_mode=True)  # [B, 3, h, w]
    distance = ((blocks[:, None] - colours[None, :, :, None, None]) ** 2).sum(2)
    return -distance / (2 * 20.0**2)


def load_model(path: str, device: str):
    from transformers import AutoModel

    import hf_useg  # noqa: F401  (registers the Auto classes)

    return AutoModel.from_pretrained(path).to(device).eval()


@torch.no_grad()
def model_logits(model, images: np.ndarray, device: str, batch_size: int = 4) -> torch.Tensor:
    """The model's cluster log-probabilities at image size (flip TTA), as `hf-useg evaluate` computes them."""
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).float() / 255
        pixel_values = ((x - IMAGENET_MEAN) / IMAGENET_STD).to(device)
        size = [16 * max(1, round(side / 16)) for side in images.shape[1:3]]  # ViTs need whole patches
        if size != list(images.shape[1:3]):
            pixel_values = F.interpolate(pixel_values, size=size, mode="bilinear", align_corners=False)
        prediction = model.predict(pixel_values, output_size=tuple(images.shape[1:3]), flip_tta=True)
        out.append(prediction.cluster_log_probs.float().cpu())
    return torch.cat(out)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def agreement(q: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    diff = (q - reference).abs()
    return {
        "argmax_agreement": (q.argmax(1) == reference.argmax(1)).float().mean().item(),
        "mean_abs_dq": diff.mean().item(),
        "max_abs_dq": diff.max().item(),
    }


def have_reference() -> bool:
    try:
        from pydensecrf import densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def timed(function, device: str) -> tuple[object, float, float]:
    """(result, wall seconds, CPU seconds of this process: every thread's, so above the wall time when threads
    run in parallel)."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def time_rows(images: np.ndarray, logits: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    """Both backends on one batch, interleaved `args.repeats` times (the torch backend at each thread count of the
    sweep); medians per image, one row per thread count."""
    batch = len(images)
    device_images = torch.from_numpy(images).to(args.device)
    device_logits = logits.to(args.device)
    default_threads = torch.get_num_threads()
    # the torch backend's first call (Gaussian taps, allocator) apart, on one image
    _, first_call, _ = timed(
        lambda: dense_crf_batch(device_images[:1], device_logits[:1], backend="torch"), args.device
    )
    reference_wall, reference_cpu, pool_wall = [], [], []
    torch_wall = {threads: [] for threads in args.threads}
    torch_cpu = {threads: [] for threads in args.threads}
    outputs, reference = {}, None
    try:
        for _ in range(args.repeats):
            if args.reference:
                reference, wall, cpu = timed(lambda: dense_crf_batch(images, logits), "cpu")
                reference_wall.append(wall / batch)
                reference_cpu.append(cpu / batch)
            for threads in args.threads:
                torch.set_num_threads(threads)
                outputs[threads], wall, cpu = timed(
                    lambda: dense_crf_batch(device_images, device_logits, backend="torch"), args.device
                )
                torch_wall[threads].append(wall / batch)
                torch_cpu[threads].append(cpu / batch)
            torch.set_num_threads(default_threads)
            if args.workers and args.reference:
                _, wall, _ = timed(lambda: dense_crf_batch(images, logits, num_workers=args.workers), "cpu")
                pool_wall.append(wall / batch)
    finally:
        torch.set_num_threads(default_threads)
    median = statistics.median
    rows = []
    for threads in args.threads:
        row = {
            "size": f"{images.shape[2]}x{images.shape[1]}",
            "batch": batch,
            "num_labels": logits.shape[1],
            "torch_threads": threads if args.device == "cpu" else None,
            "pydensecrf_s_per_image": median(reference_wall) if reference_wall else None,
            "torch_s_per_image": median(torch_wall[threads]),
            "speed_up": median(reference_wall) / median(torch_wall[threads]) if reference_wall else None,
            "pydensecrf_cpu_s_per_image": median(reference_cpu) if reference_cpu else None,
            "torch_cpu_s_per_image": median(torch_cpu[threads]),
            "torch_first_call_s": first_call,
        }
        if pool_wall:
            row[f"pydensecrf_{args.workers}_workers_s_per_image"] = median(pool_wall)
        if reference is not None:
            row.update(agreement(outputs[threads].cpu(), reference))
        rows.append(row)
    return rows


def print_rows(rows: list[dict], workers: int) -> None:
    pool = f"pool x{workers} s/img" if any(f"pydensecrf_{workers}_workers_s_per_image" in r for r in rows) else None
    header = ["size", "K", "batch", "threads", "pydensecrf s/img", "torch s/img", "speed-up"]
    header += [pool] if pool else []
    header += ["CPU s/img ref | torch", "argmax agree", "mean |dQ|", "max |dQ|", "torch 1st image s"]
    print(" | ".join(header))

    def number(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for row in rows:
        cells = [
            row["size"],
            str(row["num_labels"]),
            str(row["batch"]),
            str(row["torch_threads"] or "-"),
            number(row["pydensecrf_s_per_image"], ".3f"),
            number(row["torch_s_per_image"], ".3f"),
            number(row["speed_up"], ".2f") + ("x" if row["speed_up"] else ""),
        ]
        if pool:
            cells.append(number(row.get(f"pydensecrf_{workers}_workers_s_per_image"), ".3f"))
        cells += [
            f"{number(row['pydensecrf_cpu_s_per_image'], '.3f')} | {row['torch_cpu_s_per_image']:.3f}",
            "-" if "argmax_agreement" not in row else f"{100 * row['argmax_agreement']:.2f}%",
            number(row.get("mean_abs_dq"), ".2e"),
            number(row.get("max_abs_dq"), ".3f"),
            f"{row['torch_first_call_s']:.3f}",
        ]
        print(" | ".join(cells))


@torch.no_grad()
def camvid_miou(model, root: Path, args: argparse.Namespace) -> dict:
    """The model's cluster mIoU on CamVid val (protocol crops, flip TTA, Hungarian) with no CRF and each backend."""
    from hf_useg.data import load_segmentation_dataset, segmentation_metadata
    from hf_useg.evaluation import UnsupervisedSegmentationMetric
    from hf_useg.image_processing import protocol_image_processor
    from hf_useg.inference import evaluation_loader

    dataset = load_segmentation_dataset(str(root), "val")
    num_classes = segmentation_metadata(dataset)["num_classes"]
    max_images = 4 if args.small else None
    loader = evaluation_loader(
        dataset, protocol_image_processor(args.resolution), num_classes, batch_size=8, max_images=max_images
    )
    backends = ("pydensecrf", "torch") if args.reference else ("torch",)
    metrics, seconds, agree, num_images = {}, dict.fromkeys(backends, 0.0), [], 0
    for batch in loader:
        pixel_values, labels = batch["pixel_values"].to(args.device), batch["labels"]
        log_probs = model.predict(pixel_values, output_size=tuple(labels.shape[-2:])).cluster_log_probs.float()
        images = denormalize_to_uint8(pixel_values.float().cpu())  # what `predict(crf=True)` hands the CRF
        predictions = {"none": log_probs.argmax(1).cpu()}
        marginals = {}
        for backend in backends:
            source = log_probs.cpu() if backend == "pydensecrf" else log_probs
            synchronize(args.device)
            t0 = time.perf_counter()
            marginals[backend] = dense_crf_batch(images, source, backend=backend).cpu()
            synchronize(args.device)
            seconds[backend] += time.perf_counter() - t0
            predictions[backend] = marginals[backend].argmax(1)
        if args.reference:
            agree.append(agreement(marginals["torch"], marginals["pydensecrf"]))
        for name, prediction in predictions.items():
            if name not in metrics:
                metrics[name] = UnsupervisedSegmentationMetric(
                    num_classes=num_classes, num_clusters=log_probs.shape[1], matching="hungarian"
                )
            metrics[name].update(prediction, labels)
        num_images += len(labels)
    results = {name: metric.compute() for name, metric in metrics.items()}
    agreements = {}
    if agree:
        agreements = {
            "argmax_agreement": statistics.fmean(a["argmax_agreement"] for a in agree),
            "mean_abs_dq": statistics.fmean(a["mean_abs_dq"] for a in agree),
        }
    return {
        "num_images": num_images,
        "resolution": args.resolution,
        "mean_iou": {name: float(r["mean_iou"]) for name, r in results.items()},
        "accuracy": {name: float(r["accuracy"]) for name, r in results.items()},
        "crf_s_per_image": {name: value / num_images for name, value in seconds.items()},
        **agreements,
    }


def thread_counts(text: str | None) -> list[int]:
    """``--threads``: a comma-separated list; by default 1 and torch's default (one per core), deduplicated."""
    if text is None:
        return sorted({1, torch.get_num_threads()})
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--threads wants positive integers, got {text!r}")
    return list(dict.fromkeys(counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--camvid", type=Path, default=CAMVID, help="CamVid folder (images/val, splits/val.txt)")
    parser.add_argument("--model", help="a fitted hf_useg model folder whose cluster logits to use")
    parser.add_argument("--device", default="cpu", help="device of the torch backend (and the model): cpu, cuda")
    parser.add_argument("--num-images", type=int, default=8, help="batch size of the timed runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=27, help="K of the proxy logits")
    parser.add_argument("--workers", type=int, default=0, help="also time the reference in this many processes")
    parser.add_argument("--miou", action="store_true", help="CamVid val mIoU with each backend (needs --model)")
    parser.add_argument("--resolution", type=int, default=320, help="crop of the 320 row and of --miou")
    parser.add_argument("--small", action="store_true", help="CI size: 2 images at 1/4 size, 1 repeat")
    parser.add_argument(
        "--threads",
        help="torch CPU thread counts to time, comma-separated, e.g. 1,2 (default: 1 and torch's default)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    try:
        args.threads = thread_counts(args.threads) if args.device == "cpu" else [torch.get_num_threads()]
    except (ValueError, argparse.ArgumentTypeError) as err:
        parser.error(str(err))
    if args.miou and not args.model:
        parser.error("--miou needs --model (a fitted model whose clusters to score)")
    if args.small:
        args.num_images, args.repeats = min(args.num_images, 2), 1
    scale = 4 if args.small else 1
    args.reference = have_reference()

    model = load_model(args.model, args.device) if args.model else None
    have_camvid = (args.camvid / "splits" / "val.txt").is_file()
    sizes = [(args.resolution // scale, args.resolution // scale), (360 // scale, 480 // scale)]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    device_name = device_name or platform.machine()
    load_before = os.getloadavg()[0]
    print(
        f"dense CRF, pydensecrf2 vs torch ({args.device}): {os.cpu_count()} CPUs {device_name}, torch "
        f"{torch.__version__}, default {torch.get_num_threads()} threads; load average {load_before:.2f}"
    )
    if not args.reference:
        print("pydensecrf2 is not installed: the torch backend alone, no reference column or agreement")
    if have_camvid:
        print(f"images: the first {args.num_images} CamVid val images ({args.camvid})")
    else:
        print(f"CamVid not found at {args.camvid}: timing and agreement on synthetic images instead")
    print(f"logits: {f'the cluster log-probabilities of {args.model}' if model else 'deterministic colour proxy'}")

    rows = []
    for height, width in sizes:
        if have_camvid:
            crop = height if height == width else None
            images = camvid_batch(args.camvid, args.num_images, crop)
            if crop is None and images.shape[1:3] != (height, width):
                images = np.stack([np.asarray(Image.fromarray(i).resize((width, height))) for i in images])
        else:
            images = synthetic_batch(args.num_images, height, width)
        logits = model_logits(model, images, args.device) if model else proxy_logits(images, args.num_classes)
        rows += time_rows(images, logits, args)
    shutdown_crf_workers()
    load_after = os.getloadavg()[0]
    print(
        f"load average after the timing: {load_after:.2f} (pydensecrf runs on one core; above the number of cores "
        "every process gets less)"
    )
    print_rows(rows, args.workers)
    results = {
        "benchmark": "crf",
        "device": f"{args.device} ({device_name})",
        "config": {
            "num_images": args.num_images,
            "repeats": args.repeats,
            "num_labels": args.num_classes if model is None else None,
            "images": "camvid val" if have_camvid else "synthetic",
            "logits": args.model or "colour proxy",
            "torch_threads": args.threads,
            "reference": "pydensecrf2" if args.reference else None,
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "rows": rows,
    }

    if args.miou:
        if not have_camvid:
            print(f"--miou skipped: CamVid not found at {args.camvid}")
        else:
            miou = camvid_miou(model, args.camvid, args)
            results["camvid_val"] = miou
            size = f"{miou['resolution']}x{miou['resolution']}"
            print(f"\nCamVid val, {miou['num_images']} images at {size}, cluster probe (Hungarian)")
            if "argmax_agreement" in miou:
                print(
                    f"torch vs reference argmax agreement {100 * miou['argmax_agreement']:.2f}%, "
                    f"mean |dQ| {miou['mean_abs_dq']:.2e}"
                )
            print("CRF | mIoU % | accuracy % | CRF s/img")
            for name in miou["mean_iou"]:
                timing = f"{miou['crf_s_per_image'][name]:.3f}" if name in miou["crf_s_per_image"] else "-"
                print(f"{name} | {100 * miou['mean_iou'][name]:.2f} | {100 * miou['accuracy'][name]:.2f} | {timing}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
