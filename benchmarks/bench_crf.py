"""Dense CRF: the `pydensecrf2` reference against the PyTorch backend, on the same images in the same run.

STEGO's CRF (METHODS 0.7: 10 mean-field iterations, Gaussian sxy 1 / compat 3, bilateral sxy 67 / srgb 3 /
compat 4) on batches of real CamVid val images (``../shared/data/camvid11``) at 320x320 (the evaluation
protocol's crop: shorter side to 320, centre crop) and at CamVid's full 480x360. For each size one table row:
per-image time of each backend (median of the repeats, the backends interleaved), torch time / reference time,
and how far the torch marginals are from the reference (fraction of pixels whose argmax matches, mean and max
|dQ|).

The logits come from a fitted model when ``--model`` names one (its cluster log-probabilities, flip TTA, as
``hf-useg evaluate`` computes them); otherwise from a deterministic proxy (said so in the output): distances of
each 8x8 block's mean colour to 27 fixed colours, i.e. logits at ViT-8 patch resolution that follow the image's
regions. ``--miou`` (needs ``--model``) also scores the model's clusters on all of CamVid val with no CRF and
with each backend (Hungarian matching, the protocol's 320x320 crops). Without CamVid the timing runs on
synthetic images and agreement is reported for them; ``--small`` shrinks everything to CI size.

    python benchmarks/bench_crf.py                                   # CamVid val, 8 images, proxy logits
    python benchmarks/bench_crf.py --model outputs/km-camvid/model --miou
    python benchmarks/bench_crf.py --device cuda                     # the torch backend on the GPU
    python benchmarks/bench_crf.py --small                           # seconds: 2 small images, 1 repeat
    python benchmarks/bench_crf.py --workers 2                       # also the reference in 2 processes
    python benchmarks/bench_crf.py --threads 1                       # see below

pydensecrf runs on one core. On a CPU that other processes keep busy (a load average above the number of cores)
torch's default one-thread-per-core makes its threads wait on each other at every operation, and the torch
backend is then several times slower than with ``--threads 1``; the header prints the load average.

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


def time_row(images: np.ndarray, logits: torch.Tensor, args: argparse.Namespace) -> dict:
    """Both backends on one batch, interleaved `args.repeats` times; medians per image."""
    batch = len(images)
    device_images = torch.from_numpy(images).to(args.device)
    device_logits = logits.to(args.device)
    synchronize(args.device)
    t0 = time.perf_counter()  # the torch backend's first call (allocator, kernels, Gaussian taps) apart
    dense_crf_batch(device_images, device_logits, backend="torch")
    synchronize(args.device)
    first_call = time.perf_counter() - t0
    reference_times, torch_times, pool_times = [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        reference = dense_crf_batch(images, logits)
        reference_times.append((time.perf_counter() - t0) / batch)
        t0 = time.perf_counter()
        q = dense_crf_batch(device_images, device_logits, backend="torch")
        synchronize(args.device)
        torch_times.append((time.perf_counter() - t0) / batch)
        if args.workers:
            t0 = time.perf_counter()
            dense_crf_batch(images, logits, num_workers=args.workers)
            pool_times.append((time.perf_counter() - t0) / batch)
    row = {
        "size": f"{images.shape[2]}x{images.shape[1]}",
        "batch": batch,
        "num_labels": logits.shape[1],
        "pydensecrf_s_per_image": statistics.median(reference_times),
        "torch_s_per_image": statistics.median(torch_times),
        "torch_first_call_s_per_image": first_call / batch,
        "all_pydensecrf_s_per_image": reference_times,
        "all_torch_s_per_image": torch_times,
        **agreement(q.cpu(), reference),
    }
    if pool_times:
        row[f"pydensecrf_{args.workers}_workers_s_per_image"] = statistics.median(pool_times)
    row["torch_over_pydensecrf"] = row["torch_s_per_image"] / row["pydensecrf_s_per_image"]
    return row


def print_rows(rows: list[dict], workers: int) -> None:
    pool = f"pool x{workers} s/img" if workers else None
    header = ["size", "K", "batch", "pydensecrf s/img", "torch s/img", "torch/ref", "speed-up"]
    header += [pool] if pool else []
    header += ["argmax agree", "mean |dQ|", "max |dQ|", "torch 1st call s/img"]
    print(" | ".join(header))
    for row in rows:
        cells = [
            row["size"],
            str(row["num_labels"]),
            str(row["batch"]),
            f"{row['pydensecrf_s_per_image']:.3f}",
            f"{row['torch_s_per_image']:.3f}",
            f"{row['torch_over_pydensecrf']:.2f}",
            f"{1 / row['torch_over_pydensecrf']:.2f}x",
        ]
        if pool:
            cells.append(f"{row[f'pydensecrf_{workers}_workers_s_per_image']:.3f}")
        cells += [
            f"{100 * row['argmax_agreement']:.2f}%",
            f"{row['mean_abs_dq']:.2e}",
            f"{row['max_abs_dq']:.3f}",
            f"{row['torch_first_call_s_per_image']:.3f}",
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
    metrics, seconds, agree, num_images = {}, {"pydensecrf": 0.0, "torch": 0.0}, [], 0
    for batch in loader:
        pixel_values, labels = batch["pixel_values"].to(args.device), batch["labels"]
        log_probs = model.predict(pixel_values, output_size=tuple(labels.shape[-2:])).cluster_log_probs.float()
        images = denormalize_to_uint8(pixel_values.float().cpu())  # what `predict(crf=True)` hands the CRF
        predictions = {"none": log_probs.argmax(1).cpu()}
        marginals = {}
        for backend in ("pydensecrf", "torch"):
            source = log_probs.cpu() if backend == "pydensecrf" else log_probs
            synchronize(args.device)
            t0 = time.perf_counter()
            marginals[backend] = dense_crf_batch(images, source, backend=backend).cpu()
            synchronize(args.device)
            seconds[backend] += time.perf_counter() - t0
            predictions[backend] = marginals[backend].argmax(1)
        agree.append(agreement(marginals["torch"], marginals["pydensecrf"]))
        for name, prediction in predictions.items():
            if name not in metrics:
                metrics[name] = UnsupervisedSegmentationMetric(
                    num_classes=num_classes, num_clusters=log_probs.shape[1], matching="hungarian"
                )
            metrics[name].update(prediction, labels)
        num_images += len(labels)
    results = {name: metric.compute() for name, metric in metrics.items()}
    return {
        "num_images": num_images,
        "resolution": args.resolution,
        "mean_iou": {name: float(r["mean_iou"]) for name, r in results.items()},
        "accuracy": {name: float(r["accuracy"]) for name, r in results.items()},
        "crf_s_per_image": {name: value / num_images for name, value in seconds.items()},
        "argmax_agreement": statistics.fmean(a["argmax_agreement"] for a in agree),
        "mean_abs_dq": statistics.fmean(a["mean_abs_dq"] for a in agree),
    }


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
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.miou and not args.model:
        parser.error("--miou needs --model (a fitted model whose clusters to score)")
    if args.small:
        args.num_images, args.repeats = min(args.num_images, 2), 1
    scale = 4 if args.small else 1

    model = load_model(args.model, args.device) if args.model else None
    have_camvid = (args.camvid / "splits" / "val.txt").is_file()
    sizes = [(args.resolution // scale, args.resolution // scale), (360 // scale, 480 // scale)]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    print(
        f"dense CRF, pydensecrf2 vs torch ({args.device}): {os.cpu_count()} CPUs {device_name or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}"
    )
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
        rows.append(time_row(images, logits, args))
    shutdown_crf_workers()
    print(f"load average after the timing: {os.getloadavg()[0]:.2f} (a busy machine slows torch's threads most)")
    print_rows(rows, args.workers)
    results = {"rows": rows}

    if args.miou:
        if not have_camvid:
            print(f"--miou skipped: CamVid not found at {args.camvid}")
        else:
            miou = camvid_miou(model, args.camvid, args)
            results["camvid_val"] = miou
            print(
                f"\nCamVid val, {miou['num_images']} images at {miou['resolution']}x{miou['resolution']}, cluster "
                f"probe (Hungarian): torch vs reference argmax agreement {100 * miou['argmax_agreement']:.2f}%, "
                f"mean |dQ| {miou['mean_abs_dq']:.2e}"
            )
            print("CRF | mIoU % | accuracy % | CRF s/img")
            for name in ("none", "pydensecrf", "torch"):
                timing = f"{miou['crf_s_per_image'][name]:.3f}" if name in miou["crf_s_per_image"] else "-"
                print(f"{name} | {100 * miou['mean_iou'][name]:.2f} | {100 * miou['accuracy'][name]:.2f} | {timing}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
