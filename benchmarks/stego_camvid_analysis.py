"""What STEGO's training signal and its clusters look like for each class, from the runs of benchmarks/camvid_table.py.

    python benchmarks/stego_camvid_analysis.py --table-dir outputs/camvid-table --seeds 0 1

For every STEGO run of the table (each backbone, each STEGO variant) it reads what the run left on disk and prints
three tables:

* **kNN positives** (the run's ``knn_cache``, its feature cache's labels): how often the partner an item is paired
  with (ranks 1..``num_neighbors`` of its kNN list, METHODS 0.6) is another crop of the same image, the same crop
  position of another image, or an image at most 3 places away in the split (CamVid's split files list video frames
  in order, 1 s apart); then, per class, P(partner shows the class | the item shows it), against the same
  probability for a random partner (the class's frequency). A class is "shown" by an item when it covers at least
  1% of its labelled pixels. A class whose kNN rate is close to its frequency gets no help from the kNN term.
* **clusters** (the evaluation's confusion matrix, ``eval-<split>-<res>px/eval_results.json``): how many of the
  clusters are ever predicted, and which classes the Hungarian matching leaves with a cluster that predicts next to
  nothing of them (IoU < 1%).
* **per-class IoU** of each STEGO run beside the k-means run on the same backbone.

It reads files only (no model runs) and takes seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

CLASS_SHOWN = 0.01
FRAME_WINDOW = 3


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def knn_statistics(knn: torch.Tensor, labels: torch.Tensor, num_classes: int, num_neighbors: int) -> dict:
    """Partner statistics of a kNN table ``[N, k]`` over five-crop items (item ``5 i + c`` is crop ``c`` of image
    ``i``) with labels ``[N, H, W]`` (-1 ignored)."""
    count = knn.shape[0]
    partners = knn[:, 1 : num_neighbors + 1]
    own = torch.arange(count)[:, None]
    source, crop = own // 5, own % 5
    statistics = {
        "same_image": (partners // 5 == source).float().mean().item(),
        "same_crop_position": (partners % 5 == crop).float().mean().item(),
        f"within_{FRAME_WINDOW}_images": ((partners // 5 - source).abs() <= FRAME_WINDOW).float().mean().item(),
    }
    flat = labels.reshape(count, -1)
    valid = (flat >= 0).sum(1).clamp_min(1)
    shown = torch.stack([((flat == c).sum(1) / valid) >= CLASS_SHOWN for c in range(num_classes)], 1)  # [N, K]
    per_class = []
    for c in range(num_classes):
        items = shown[:, c].nonzero()[:, 0]
        frequency = shown[:, c].float().mean().item()
        rate = shown[partners[items], c].float().mean().item() if len(items) else float("nan")
        per_class.append({"frequency": frequency, "knn_rate": rate})
    statistics["per_class"] = per_class
    return statistics


def cluster_usage(results: dict) -> dict:
    cluster = results["cluster"]
    matrix = np.asarray(cluster["confusion_matrix"])  # [classes, clusters]
    used = int((matrix.sum(0) > 0).sum())
    iou = np.asarray(cluster["per_class_iou"], dtype=float)
    return {"clusters": matrix.shape[1], "used": used, "lost_classes": [int(c) for c in np.where(iou < 0.01)[0]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table-dir", type=Path, default=Path("outputs/camvid-table"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eval-folder", default="eval-val-320px")
    parser.add_argument("--num-neighbors", type=int, default=7, help="STEGO's num_neighbors (ranks drawn from)")
    parser.add_argument("--dataset", type=Path, default=Path("../shared/data/camvid11"), help="for classes.json")
    args = parser.parse_args(argv)

    from hf_useg.models.stego.training_stego import FeatureCache

    classes_file = args.dataset / "classes.json"
    if classes_file.is_file():
        class_names = [entry["name"] for entry in _load_json(classes_file)["classes"]]
    else:
        class_names = [f"class {c}" for c in range(11)]
    num_classes = len(class_names)
    knn_rows, cluster_rows, iou_rows = [], [], []
    for seed in args.seeds:
        seed_dir = args.table_dir / f"seed{seed}"
        for run in sorted(seed_dir.glob("stego*")):
            backbone = "self-trained" if run.name.endswith("self-trained") else "random"
            tables = sorted((run / "knn_cache").glob("knn-*.pt"))
            caches = sorted((run / "feature_cache").glob("features-*"))
            if tables and caches:
                cache = FeatureCache.open(caches[0])
                if cache.has_labels:
                    statistics = knn_statistics(torch.load(tables[0]), cache.labels, num_classes, args.num_neighbors)
                    knn_rows.append((seed, run.name, statistics))
            results_path = run / args.eval_folder / "eval_results.json"
            kmeans_path = seed_dir / f"kmeans-{backbone}" / args.eval_folder / "eval_results.json"
            if results_path.is_file():
                results = _load_json(results_path)
                cluster_rows.append((seed, run.name, cluster_usage(results)))
                kmeans = _load_json(kmeans_path)["cluster"]["per_class_iou"] if kmeans_path.is_file() else None
                iou_rows.append((seed, run.name, results["cluster"]["per_class_iou"], kmeans))
    if not knn_rows and not cluster_rows:
        raise SystemExit(f"no STEGO runs with kNN tables or evaluations under {args.table_dir}/seed*/stego*")

    if knn_rows:
        print(f"kNN positives (ranks 1..{args.num_neighbors}); per class: P(partner shows c | item shows c) / freq\n")
        header = ["seed", "run", "same image", "same crop pos.", f"<= {FRAME_WINDOW} images away", *class_names]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for seed, name, statistics in knn_rows:
            cells = [str(seed), name, *(f"{100 * statistics[key]:.0f}%" for key in list(statistics)[:3])]
            for entry in statistics["per_class"]:
                cells.append(f"{entry['knn_rate']:.2f} / {entry['frequency']:.2f}")
            print("| " + " | ".join(cells) + " |")
    if cluster_rows:
        print("\nclusters predicted on val, and classes left with IoU < 1%\n")
        print("| seed | run | clusters used | classes lost |\n|---|---|---|---|")
        for seed, name, usage in cluster_rows:
            lost = ", ".join(class_names[c] for c in usage["lost_classes"]) or "none"
            print(f"| {seed} | {name} | {usage['used']} of {usage['clusters']} | {lost} |")
        print("\nper-class IoU (%), STEGO run / k-means on the same backbone\n")
        print("| seed | run | " + " | ".join(class_names) + " |")
        print("|" + "---|" * (len(class_names) + 2))
        for seed, name, iou, kmeans in iou_rows:
            cells = [
                f"{100 * a:.1f} / {100 * b:.1f}" if kmeans is not None else f"{100 * a:.1f}"
                for a, b in zip(iou, kmeans if kmeans is not None else iou)
            ]
            print(f"| {seed} | {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
