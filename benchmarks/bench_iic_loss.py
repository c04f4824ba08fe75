"""Speed of `iic_segmentation_loss` (forward + backward): the one-conv2d joint against a plain loop over the
(2T+1)² displacements (slicing + einsum), for a few sizes.

    python benchmarks/bench_iic_loss.py                          # CPU, small sizes
    python benchmarks/bench_iic_loss.py --device cuda --paper    # adds a paper-like size

`--paper` adds K=15 (COCO-Stuff-15's head B), 128x128 outputs, T=10, batch 16. Not a test: prints a table.
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_useg.models.iic.loss_iic import _mutual_information, iic_segmentation_loss


def loop_loss(x1: torch.Tensor, x2: torch.Tensor, displacement: int) -> torch.Tensor:
    """Uncollapsed loss with the joints from a Python loop over displacements (same math, no conv)."""
    _, _, height, width = x1.shape
    joints = []
    for dy in range(-displacement, displacement + 1):
        for dx in range(-displacement, displacement + 1):
            u0, u1 = max(0, -dy), min(height, height - dy)
            v0, v1 = max(0, -dx), min(width, width - dx)
            a = x1[:, :, u0 + dy : u1 + dy, v0 + dx : v1 + dx]
            b = x2[:, :, u0:u1, v0:v1]
            joints.append(torch.einsum("bihw,bjhw->ij", a, b))
    joints = torch.stack(joints)
    joints = joints / joints.sum(dim=(-2, -1), keepdim=True)
    return -_mutual_information(joints, 1.0).mean()


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paper", action="store_true", help="add the paper-size configuration")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    sizes = [(4, 5, 32, 1), (4, 15, 32, 5), (8, 15, 64, 10)]  # (B, K, H=W, T)
    if args.paper:
        sizes.append((16, 15, 128, 10))
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'B':>3} {'K':>3} {'H=W':>4} {'T':>3} | {'conv ms':>9} {'loop ms':>9} | {'|diff|':>8}")
    for batch, k, side, displacement in sizes:
        logits = torch.randn(batch, k, side, side, device=device, requires_grad=True)

        def run_conv(logits=logits, displacement=displacement):
            x = logits.softmax(dim=1)
            loss, _ = iic_segmentation_loss(x, x.roll(1, dims=-1), displacement=displacement)
            loss.backward()
            return loss

        def run_loop(logits=logits, displacement=displacement):
            x = logits.softmax(dim=1)
            loss = loop_loss(x, x.roll(1, dims=-1), displacement)
            loss.backward()
            return loss

        diff = abs(run_conv().item() - run_loop().item())
        conv_ms = timed(run_conv, args.repeats, device)
        loop_ms = timed(run_loop, args.repeats, device)
        print(f"{batch:>3} {k:>3} {side:>4} {displacement:>3} | {conv_ms:>9.1f} {loop_ms:>9.1f} | {diff:>8.1e}")


if __name__ == "__main__":
    main()
