"""IIC segmentation loss (Ji et al., ICCV 2019; METHODS 3.1): minus the mutual information between the cluster
assignments of a pixel in one view and of its (displaced) pixels in the other view."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

__all__ = ["IIC_EPS", "iic_segmentation_loss"]

# The released code clamps at float64's machine epsilon whatever the dtype. In float32 this is *not*
# float32's epsilon (1.19e-7): 2.22e-16 is an ordinary normal float32 (smallest normal 1.18e-38), so the
# clamp only replaces probabilities that are zero or below 2.22e-16, never merely "small" ones, and it
# behaves the same in float32 and float64. A clamped entry adds about 2.2e-16 * 36 ≈ 8e-15 to the loss.
IIC_EPS: float = sys.float_info.epsilon


def _check_inputs(
    x1: torch.Tensor,
    x2: torch.Tensor,
    affine2_to_1: torch.Tensor | None,
    mask: torch.Tensor | None,
    displacement: int,
    uncollapsed: bool,
) -> None:
    for name, x in (("x1", x1), ("x2", x2)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"`{name}` must be 4-D [B, K, H, W] (per-pixel softmax), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point tensor, got {x.dtype}")
    if x1.shape != x2.shape:
        raise ValueError(f"`x1` and `x2` must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    if x1.dtype != x2.dtype:
        raise TypeError(f"`x1` and `x2` must have the same dtype, got {x1.dtype} and {x2.dtype}")
    batch_size, _, height, width = x1.shape
    if isinstance(displacement, bool) or not isinstance(displacement, int):
        raise TypeError(f"`displacement` must be an int, got {type(displacement).__name__}")
    if displacement < 0:
        raise ValueError(f"`displacement` must be >= 0, got {displacement}")
    if uncollapsed and displacement >= min(height, width):
        raise ValueError(
            f"`displacement`={displacement} must be smaller than the map size {height}x{width} in the "
            "uncollapsed variant: displacements with no overlapping pixel pairs have an empty joint"
        )
    if affine2_to_1 is not None:
        if not isinstance(affine2_to_1, torch.Tensor):
            raise TypeError(f"`affine2_to_1` must be a torch.Tensor, got {type(affine2_to_1).__name__}")
        if tuple(affine2_to_1.shape) != (batch_size, 2, 3):
            raise ValueError(
                f"`affine2_to_1` must have shape [B, 2, 3] = {[batch_size, 2, 3]}, got {list(affine2_to_1.shape)}"
            )
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"`mask` must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != (batch_size, height, width):
            raise ValueError(
                f"`mask` must have shape [B, H, W] = {[batch_size, height, width]}, got {list(mask.shape)}"
            )


def _displacement_joints(x1: torch.Tensor, x2: torch.Tensor, displacement: int) -> torch.Tensor:
    """Unnormalised joints `[2T+1, 2T+1, K, K]`; entry `[dy + T, dx + T, i, j]` is
    P̃_t(i, j) = Σ_b Σ_{u,v} x1[b, i, u+dy, v+dx] · x2[b, j, u, v] (zero outside the map)."""
    # conv2d(input [N=K, C_in=B, H+2T, W+2T], weight [C_out=K, C_in=B, H, W]) gives
    # out[i, j, oy, ox] = Σ_b Σ_{u,v} x1[b, i, u + oy − T, v + ox − T] · x2[b, j, u, v], i.e. P̃_t(i, j)
    # with t = (oy − T, ox − T): x1 (the displaced one) is the input and x2 the filter, not the other way
    # round (swapping them gives P̃_t transposed and t negated).
    joints = F.conv2d(x1.transpose(0, 1), x2.transpose(0, 1), padding=displacement)  # [K, K, 2T+1, 2T+1]
    return joints.permute(2, 3, 0, 1)


def _mutual_information(joint: torch.Tensor, lamb: float) -> torch.Tensor:
    """I = Σ_ij P_ij (ln P_ij − λ ln p_i − λ ln p_j) for normalised joints `[..., K, K]`, summed over the last
    two dims. Marginals come from the unclamped joint; joint and marginals are then clamped at `IIC_EPS`
    (zero gradient where clamped, as in the released code's in-place assignment)."""
    joint = (joint + joint.transpose(-1, -2)) / 2
    p_i = joint.sum(dim=-1, keepdim=True)  # [..., K, 1]
    p_j = joint.sum(dim=-2, keepdim=True)  # [..., 1, K]
    joint = joint.clamp_min(IIC_EPS)
    p_i = p_i.clamp_min(IIC_EPS)
    p_j = p_j.clamp_min(IIC_EPS)
    return (joint * (joint.log() - lamb * p_i.log() - lamb * p_j.log())).sum(dim=(-2, -1))


def iic_segmentation_loss(
    x1: torch.Tensor,
    x2: torch.Tensor,
    affine2_to_1: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    displacement: int = 0,
    lamb: float = 1.0,
    uncollapsed: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""IIC segmentation loss (METHODS 3.1).

    **The loss is minus a mutual information, so it is negative (≤ 0 for `lamb` ≥ 1), and more negative
    is better.** A value of −ln K means the two views agree perfectly on K equally used clusters. This is
    expected; it is not a bug.

    Steps: (1) bring view 2 back into view 1's frame, `x2 ← grid_sample(x2, affine_grid(A))` (bilinear, zero
    padding, `align_corners=False`); (2) multiply both by the mask; (3) for every displacement
    t = (dy, dx) ∈ [−T, T]², the joint P̃_t(i, j) = Σ_b Σ_{u,v} x1[b, i, u+dy, v+dx] · x2[b, j, u, v] (zero
    outside the map), all computed by one `conv2d` with padding T; (4) normalise, symmetrise, take marginals,
    clamp at `IIC_EPS` (= 2.22e-16, float64's machine epsilon, in every dtype) and compute
    I = Σ_ij P_ij (ln P_ij − λ ln p_i − λ ln p_j).

    * `uncollapsed=True` (used for all paper results): one I_t per displacement, each with its own normaliser
      ΣP̃_t, which **is** differentiated; loss = −mean_t I_t.
    * `uncollapsed=False` ("condensed", the released code's default): P̃ = Σ_t P̃_t first; its normaliser is
      treated as a constant (no gradient flows through it); loss = −I.

    Args:
        x1 (`torch.Tensor` of shape `[B, K, H, W]`):
            Per-pixel softmax outputs for the images (view 1).
        x2 (`torch.Tensor` of shape `[B, K, H, W]`):
            Per-pixel softmax outputs for the transformed images (view 2).
        affine2_to_1 (`torch.Tensor` of shape `[B, 2, 3]`, *optional*):
            The affine map (in `affine_grid`'s normalised coordinates) taking view 2 back to view 1. A
            horizontal flip is `[[-1, 0, 0], [0, 1, 0]]`. `None` means identity (no resampling).
        mask (`torch.Tensor` of shape `[B, H, W]`, *optional*):
            Validity mask of view 1 (0/1; bool is accepted), multiplied into both `x1` and the re-aligned
            `x2`.
        displacement (`int`, *optional*, defaults to 0):
            Half side T of the displacement window; the paper uses T = 10.
        lamb (`float`, *optional*, defaults to 1.0):
            λ, the marginal-entropy weight: 1 is plain −MI; > 1 (1.5 for the 3-class datasets) rewards
            entropic marginals.
        uncollapsed (`bool`, *optional*, defaults to `True`):
            Per-displacement MI (paper) or MI of the displacement-summed joint (released code's default).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: scalars `(loss, loss_no_lamb)`; `loss_no_lamb` is the same loss
        with λ = 1 (for logging). Both are in `x1`'s dtype.

    Raises:
        `ValueError`: on inconsistent shapes, a negative displacement, a displacement not smaller than the map
        in the uncollapsed variant, negative inputs, or an empty joint distribution (e.g. an all-zero mask).
        `TypeError`: on non-tensor or non-floating inputs.

    Note: on CUDA, float32 convolutions use TF32 unless `torch.backends.cudnn.allow_tf32 = False`; the joint
    is then accurate to about 1e-3 relative.

    Example:

    ```python
    >>> import torch
    >>> from hf_useg.models.iic import iic_segmentation_loss
    >>> x1 = torch.randn(2, 5, 16, 16).softmax(dim=1)
    >>> hflip = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(2, 2, 3)
    >>> x2 = x1.flip(-1)  # view 2 is the flipped image; `hflip` brings it back
    >>> loss, loss_no_lamb = iic_segmentation_loss(x1, x2, affine2_to_1=hflip, displacement=1)
    >>> bool(loss < 0)  # minus a mutual information
    True
    ```
    """
    _check_inputs(x1, x2, affine2_to_1, mask, displacement, uncollapsed)
    lamb = float(lamb)

    if affine2_to_1 is not None:
        theta = affine2_to_1.to(device=x2.device, dtype=x2.dtype)
        grid = F.affine_grid(theta, list(x2.shape), align_corners=False)
        x2 = F.grid_sample(x2, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if mask is not None:
        mask = mask.to(device=x1.device, dtype=x1.dtype).unsqueeze(1)
        x1 = x1 * mask
        x2 = x2 * mask

    joints = _displacement_joints(x1, x2, displacement)  # [2T+1, 2T+1, K, K]

    if uncollapsed:
        norms = joints.sum(dim=(-2, -1), keepdim=True)  # differentiated, one per displacement
    else:
        joints = joints.sum(dim=(0, 1))
        norms = joints.sum().detach()  # a plain number: no gradient through the normaliser
    # One host sync for both checks: negative entries mean the inputs were not probabilities, and a zero
    # normaliser would turn the loss into NaN.
    min_joint, min_norm = torch.stack([joints.detach().amin(), norms.detach().amin()]).tolist()
    if min_joint < 0:
        raise ValueError("`x1` and `x2` must be non-negative (per-pixel softmax outputs); the joint has negatives")
    if min_norm <= 0:
        raise ValueError(
            "empty joint distribution (sum of P̃ is 0"
            + (" for some displacement" if uncollapsed else "")
            + "): the mask (or the re-aligned view 2) leaves no pixel pair to compare"
        )
    joints = joints / norms

    loss = -_mutual_information(joints, lamb).mean()
    loss_no_lamb = loss if lamb == 1.0 else -_mutual_information(joints, 1.0).mean()
    return loss, loss_no_lamb
