"""Patch distributions and the internal Wasserstein distance (IWD), batched over POT.

The *internal distribution* of an image is the empirical (uniform) distribution of its k x k
patches. The internal Wasserstein distance between two images of one shape is the debiased
Sinkhorn divergence between their internal distributions::

    IWD(x, x') = OT_reg(a, b) - OT_reg(a, a) / 2 - OT_reg(b, b) / 2
    OT_reg(a, b) = min over couplings T of the two uniform distributions of
                   <T, C> + reg * sum(T log T),   C_ij = ||a_i - b_j||^2 / D

where ``a`` and ``b`` are the patch sets of ``x`` and ``x'`` and the squared Euclidean ground
cost is divided by the patch dimension ``D = C*k*k``, so that it is a per-pixel mean squared
difference in [0, 1]. This is our formulation of the idea of arXiv 2103.07598 (the paper's
full text was not available to us).

Defaults (every one can be overridden per call):

- patch size ``k = 3`` and stride 1 for images whose larger side is <= 32 px; above that the
  stride is ``ceil(side / 32)`` (so the patch grid stays about 32 x 32, the cost of a 32 px
  image) and ``k = max(3, stride)`` (so that no pixel falls between patches); with a stride
  > 1 the image is padded on the bottom/right by edge replication so the last row and column
  of patches reach the border. No other padding: a 28x28 image gives 26·26 = 676 patches.
- ``reg = 0.05`` (:data:`DEFAULT_REG`), in the units of the normalized cost.
- ``tol = 3e-3`` (:data:`DEFAULT_TOL`): POT stops when the L2 norm of the row-marginal error is
  below ``tol * ||a||_2`` (a relative tolerance; POT's absolute default 1e-5 is not reachable
  in float32 for large patch sets and means different things for different patch counts).
- ``max_iter = 500`` (:data:`DEFAULT_MAX_ITER`) Sinkhorn iterations (POT checks convergence
  every 10).
- ``max_elems``: cost-matrix elements per chunk; batches are solved in chunks of
  ``max(1, max_elems // (n·m))`` images. Default (None): ``2**19`` on the CPU
  (:data:`DEFAULT_MAX_ELEMS_CPU`; one 28x28 image per chunk at stride 1, whose 676x676 cost
  matrix is 1.8 MB: buffers that stay in cache make log-Sinkhorn about 5x faster on a CPU than
  64 MB chunks, and a chunk's stopping test then sees one image only), ``2**24`` on other
  devices (:data:`DEFAULT_MAX_ELEMS`; 36 such images per chunk, 64 MiB per float32 buffer).

Numerics: the plans come from ``ot.solve_batch(M, reg, method="log_sinkhorn", grad="detach")``
(POT's batched log-domain Sinkhorn). The value we return is the *dual* objective at POT's
potentials, ``reg·(<u, a> + <v, b>) - reg·ΣT + reg`` (accumulated in float64), which is a lower
bound of OT_ε whose error is second order in the marginal violation; POT's own ``value`` is
the primal objective at a not quite feasible plan, whose error is first order (measured on
mnist-5k patches at ``reg = 0.05``, ``tol = 3e-3``: at most 0.5 % relative error of the
divergence with the dual value, up to 4 % with the primal). Gradients are envelope gradients, exactly as POT's
``grad="envelope"`` mode defines them (``dOT/dC = T``, the plan held constant), but computed
without building an autograd graph through the Sinkhorn iterations: in POT 0.9.7
``grad="envelope"`` still records every log-Sinkhorn iteration for autograd (the plan is only
detached at the end), which costs one cost-matrix-sized buffer per iteration.
"""

from __future__ import annotations

import math
from typing import Literal

import ot
import torch
import torch.nn.functional as F

from harden.errors import DataError, PolicyError

__all__ = [
    "DEFAULT_MAX_ELEMS",
    "DEFAULT_MAX_ELEMS_CPU",
    "DEFAULT_MAX_ITER",
    "DEFAULT_PATCH",
    "DEFAULT_REG",
    "DEFAULT_TOL",
    "MAX_GRID",
    "default_geometry",
    "iwd",
    "patches",
    "self_cost",
    "sinkhorn_cost",
    "sinkhorn_plan",
]

#: Default patch size k (for images <= 96 px; larger images use ``k = stride``).
DEFAULT_PATCH = 3
#: Largest side (in patches) of the default patch grid; images up to this size use stride 1.
MAX_GRID = 32
#: Default entropic regularization, in units of the normalized (per-pixel mean squared) cost.
DEFAULT_REG = 0.05
#: Default relative tolerance on the row-marginal error (``||T1 - a||_2 <= tol * ||a||_2``).
DEFAULT_TOL = 3e-3
#: Default cap on Sinkhorn iterations.
DEFAULT_MAX_ITER = 500
#: Default cap on cost-matrix elements solved at once (chunking over the batch), off the CPU.
DEFAULT_MAX_ELEMS = 2**24
#: Default cap on cost-matrix elements solved at once on the CPU (cache-sized chunks).
DEFAULT_MAX_ELEMS_CPU = 2**19


def default_geometry(height: int, width: int) -> tuple[int, int]:
    """Default ``(k, stride)`` for an image of ``height x width`` pixels.

    Stride 1 when ``max(height, width) <= 32``, else ``ceil(max(height, width) / 32)``;
    ``k = max(3, stride)`` so that patches cover every pixel.

    Example:
        >>> default_geometry(28, 28), default_geometry(32, 32), default_geometry(64, 64), default_geometry(224, 224)
        ((3, 1), (3, 1), (3, 2), (7, 7))
    """
    side = max(height, width)
    stride = 1 if side <= MAX_GRID else math.ceil(side / MAX_GRID)
    return max(DEFAULT_PATCH, stride), stride


def patches(x: torch.Tensor, k: int | None = None, stride: int | None = None) -> torch.Tensor:
    """Per-image patch sets: ``(N, P, C·k·k)`` from an NCHW batch, via ``unfold``.

    Args:
        x: images, shape ``(N, C, H, W)``.
        k: patch size; None means ``max(3, stride)`` (3 unless the stride is larger).
        stride: patch stride; None means :func:`default_geometry`'s (1 for images up to 32 px).
            With a stride > 1 the bottom/right border is padded by edge replication until the
            patch grid reaches it (no pixel is left out); with stride 1 there is no padding.

    Returns:
        ``P = ((H' - k) // stride + 1) · ((W' - k) // stride + 1)`` patches per image, each
        flattened channel-major (as ``unfold`` does); differentiable w.r.t. ``x``.

    Raises:
        DataError: ``x`` is not a 4-d tensor, or ``k`` is larger than the image.
        PolicyError: ``k`` or ``stride`` is < 1.

    Example:
        >>> patches(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 676, 9])
        >>> patches(torch.rand(2, 3, 8, 8), k=2, stride=2).shape
        torch.Size([2, 16, 12])
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise DataError(f"expected an NCHW image batch, got shape {tuple(getattr(x, 'shape', ()))}")
    h, w = x.shape[-2:]
    stride = default_geometry(h, w)[1] if stride is None else stride
    k = max(DEFAULT_PATCH, stride) if k is None else k
    if k < 1 or stride < 1:
        raise PolicyError(f"expected patch size and stride >= 1, got k={k}, stride={stride}")
    if k > min(h, w):
        raise DataError(f"expected images at least {k}x{k} px for {k}x{k} patches, got {h}x{w}")
    if stride > 1:
        pad_h, pad_w = (-(h - k)) % stride, (-(w - k)) % stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return F.unfold(x, k, stride=stride).transpose(1, 2)


def _check_solver_args(reg: float, tol: float, max_iter: int, max_elems: int | None) -> None:
    if not (isinstance(reg, (int, float)) and math.isfinite(reg) and reg > 0):
        raise PolicyError(f"expected reg > 0 (log-Sinkhorn needs a positive regularization), got {reg!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise PolicyError(f"expected tol > 0, got {tol!r}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise PolicyError(f"expected max_iter >= 1, got {max_iter!r}")
    if max_elems is not None and not (isinstance(max_elems, int) and max_elems >= 1):
        raise PolicyError(f"expected max_elems >= 1 or None, got {max_elems!r}")


def _solve_chunk(
    a_pts: torch.Tensor, b_pts: torch.Tensor, reg: float, tol: float, max_iter: int, scale: float, value: str
) -> torch.Tensor:
    """OT values of one chunk; see :func:`sinkhorn_cost`."""
    n, m = a_pts.shape[1], b_pts.shape[1]
    with torch.no_grad():
        a0, b0 = a_pts.detach(), b_pts.detach()
        cost = ot.batch.dist_batch(a0, b0) / scale
        # tol is relative: POT compares ||T1 - a||_2 with it, and ||a||_2 = 1/sqrt(n) for uniform a.
        res = ot.solve_batch(cost, reg, max_iter=max_iter, tol=tol / math.sqrt(n), method="log_sinkhorn", grad="detach")
        plan = res.plan
        if value == "linear":
            return (cost * plan).sum(dim=(1, 2))
        u, v = res.potentials
        mass = plan.sum(dim=(1, 2), dtype=torch.float64)
        dual = reg * (u.double().sum(1) / n + v.double().sum(1) / m - mass + 1.0)
        dual = dual.to(a_pts.dtype)
    if not (torch.is_grad_enabled() and (a_pts.requires_grad or b_pts.requires_grad)):
        return dual
    # Envelope gradient: d OT / d cost = plan (held constant). For the squared Euclidean cost
    # this is d/da_i = 2 (r_i a_i - (T b)_i) / scale and d/db_j = 2 (c_j b_j - (T^T a)_j) / scale;
    # `surrogate` has exactly these gradients and no saved nxm buffer.
    with torch.no_grad():
        rows, cols = plan.sum(2), plan.sum(1)
        t_b = torch.bmm(plan, b0)
        t_a = torch.bmm(plan.transpose(1, 2), a0)
    surrogate = (
        (rows * a_pts.pow(2).sum(-1)).sum(1)
        + (cols * b_pts.pow(2).sum(-1)).sum(1)
        - 2 * (a_pts * t_b).sum(dim=(1, 2))
        - 2 * (b_pts * t_a).sum(dim=(1, 2))
    ) / scale
    return dual + (surrogate - surrogate.detach())


def sinkhorn_cost(
    a_pts: torch.Tensor,
    b_pts: torch.Tensor,
    reg: float = DEFAULT_REG,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    *,
    scale: float | None = None,
    value: Literal["entropic", "linear"] = "entropic",
    max_elems: int | None = None,
) -> torch.Tensor:
    """Batched entropic OT cost between uniform point clouds, squared Euclidean ground cost.

    For each batch element solves ``min_T <T, C> + reg · Σ T log T`` over couplings of the
    uniform distributions on ``a_pts[i]`` and ``b_pts[i]``, with
    ``C_jl = ||a_j - b_l||^2 / scale``, using POT's ``ot.solve_batch`` (``method="log_sinkhorn"``,
    torch backend) in chunks of images.

    Args:
        a_pts: source points, shape ``(B, n, D)``.
        b_pts: target points, shape ``(B, m, D)``, same dtype and device.
        reg: entropic regularization (> 0), in units of the scaled cost. Default 0.05.
        tol: relative tolerance: stop when ``||T1 - a||_2 <= tol · ||a||_2``. Default 3e-3.
        max_iter: Sinkhorn iterations at most. Default 500.
        scale: the squared distance is divided by it; None (default) means ``D``.
        value: ``"entropic"`` (default) returns ``OT_reg`` (the dual objective at POT's
            potentials, see the module docstring), differentiable w.r.t. both point sets with
            envelope gradients; ``"linear"`` returns ``<T, C>`` at POT's plan (what
            ``ot.sinkhorn2`` returns), without gradients.
        max_elems: cost-matrix elements per chunk (``B`` is split so a chunk has at most
            ``max(n·m, max_elems)``). None (default): ``2**19`` on the CPU, ``2**24`` elsewhere.

    Returns:
        Shape ``(B,)``, the dtype of the inputs.

    Raises:
        DataError: the point sets are not ``(B, n, D)`` / ``(B, m, D)`` floats of one batch size.
        PolicyError: a solver argument is out of range.

    Example:
        >>> a = torch.zeros(1, 4, 2)
        >>> b = torch.ones(1, 4, 2)  # every point moves by squared distance 2, i.e. cost 2 / D = 1
        >>> round(sinkhorn_cost(a, b, reg=0.01, value="linear").item(), 4)
        1.0
    """
    _check_solver_args(reg, tol, max_iter, max_elems)
    for name, t in (("a_pts", a_pts), ("b_pts", b_pts)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point() or 0 in t.shape:
            shape = tuple(getattr(t, "shape", ()))
            raise DataError(f"expected {name} as a non-empty float (B, n, D) tensor, got {shape}")
    if a_pts.shape[0] != b_pts.shape[0] or a_pts.shape[2] != b_pts.shape[2] or a_pts.dtype != b_pts.dtype:
        raise DataError(
            f"expected point sets of one batch size, dimension and dtype, got {tuple(a_pts.shape)} {a_pts.dtype} "
            f"and {tuple(b_pts.shape)} {b_pts.dtype}"
        )
    if value not in ("entropic", "linear"):
        raise PolicyError(f"expected value 'entropic' or 'linear', got {value!r}")
    scale = float(a_pts.shape[2]) if scale is None else float(scale)
    if not scale > 0:
        raise PolicyError(f"expected scale > 0, got {scale}")
    batch, n, m = a_pts.shape[0], a_pts.shape[1], b_pts.shape[1]
    if max_elems is None:
        max_elems = DEFAULT_MAX_ELEMS_CPU if a_pts.device.type == "cpu" else DEFAULT_MAX_ELEMS
    per_chunk = max(1, max_elems // (n * m))
    out = [
        _solve_chunk(a_pts[i : i + per_chunk], b_pts[i : i + per_chunk], reg, tol, max_iter, scale, value)
        for i in range(0, batch, per_chunk)
    ]
    return torch.cat(out)


def self_cost(
    x: torch.Tensor,
    *,
    k: int | None = None,
    stride: int | None = None,
    reg: float = DEFAULT_REG,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    max_elems: int | None = None,
) -> torch.Tensor:
    """``OT_reg(a, a)`` of each image's patch distribution with itself, detached, shape ``(N,)``.

    The debiasing term of :func:`iwd` that depends on the clean image only: an attack computes
    it once and passes it as ``x_self`` to every :func:`iwd` call. Arguments as in :func:`iwd`.

    Example:
        >>> x = torch.rand(2, 1, 8, 8)
        >>> torch.equal(iwd(x, x, x_self=self_cost(x)), iwd(x, x))
        True
    """
    with torch.no_grad():
        pts = patches(x.detach(), k, stride)
        return sinkhorn_cost(pts, pts, reg, tol, max_iter, max_elems=max_elems)


def iwd(
    x: torch.Tensor,
    x_adv: torch.Tensor,
    *,
    k: int | None = None,
    stride: int | None = None,
    reg: float = DEFAULT_REG,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    max_elems: int | None = None,
    x_self: torch.Tensor | None = None,
) -> torch.Tensor:
    """Internal Wasserstein distance: debiased Sinkhorn divergence of the patch distributions.

    ``IWD(x, x') = OT(a, b) - OT(a, a)/2 - OT(b, b)/2`` with ``a``, ``b`` the patch sets of
    ``x``, ``x'`` (:func:`patches`) and ``OT`` the entropic cost of :func:`sinkhorn_cost`
    (ground cost: squared Euclidean distance divided by the patch dimension). It is >= 0 and 0
    iff the patch distributions are equal (up to the solver's tolerance: values of order
    ``1e-6`` either side of 0 are numerical noise), and it is differentiable w.r.t. ``x_adv``
    (and ``x``) with envelope gradients. This is our formulation of arXiv 2103.07598's idea.

    Args:
        x: reference images, ``(N, C, H, W)``.
        x_adv: images of the same shape.
        k: patch size; None = ``max(3, stride)`` (3 for images up to 96 px).
        stride: patch stride; None = 1 for images up to 32 px, ``ceil(side / 32)`` above.
        reg: entropic regularization. Default 0.05 (units: per-pixel mean squared difference).
        tol: relative Sinkhorn tolerance on the marginals. Default 3e-3.
        max_iter: Sinkhorn iterations at most. Default 500.
        max_elems: cost-matrix elements per chunk. None (default): ``2**19`` on the CPU, ``2**24`` elsewhere.
        x_self: precomputed :func:`self_cost` of ``x`` (same settings), to skip one of the
            three OT problems; it is treated as a constant.

    Returns:
        Shape ``(N,)``.

    Raises:
        DataError: ``x`` and ``x_adv`` differ in shape, or ``x_self`` does not match.

    Example:
        >>> x = torch.rand(4, 1, 12, 12)
        >>> small, large = (x + 0.05 * torch.randn_like(x)), (x + 0.2 * torch.randn_like(x))
        >>> bool((iwd(x, small) < iwd(x, large)).all())
        True
    """
    if not isinstance(x_adv, torch.Tensor) or not isinstance(x, torch.Tensor) or x.shape != x_adv.shape:
        shapes = tuple(getattr(x, "shape", ())), tuple(getattr(x_adv, "shape", ()))
        raise DataError(f"expected x and x_adv of one shape, got {shapes[0]} and {shapes[1]}")
    pa, pb = patches(x, k, stride), patches(x_adv, k, stride)
    ab = sinkhorn_cost(pa, pb, reg, tol, max_iter, max_elems=max_elems)
    if x_self is None:
        aa = sinkhorn_cost(pa, pa, reg, tol, max_iter, max_elems=max_elems)
    else:
        if x_self.shape != (x.shape[0],):
            raise DataError(f"expected x_self of shape ({x.shape[0]},), got {tuple(x_self.shape)}")
        aa = x_self.detach().to(ab.dtype)
    bb = sinkhorn_cost(pb, pb, reg, tol, max_iter, max_elems=max_elems)
    return ab - 0.5 * aa - 0.5 * bb


def sinkhorn_plan(
    cost: torch.Tensor, reg: float, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER
) -> torch.Tensor:
    """Entropic OT plan between uniform distributions for one cost matrix ``(n, m)``, detached.

    POT's batched log-domain Sinkhorn (``ot.solve_batch``, explicit ``reg`` and relative
    ``tol`` as in :func:`sinkhorn_cost`). ``(plan * cost).sum()`` is then a loss whose gradient
    w.r.t. ``cost`` is the plan (the envelope theorem), as used by the ``ot_metric`` objective.

    Example:
        >>> c = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        >>> sinkhorn_plan(c, reg=0.01).diagonal().tolist()
        [0.5, 0.5]
    """
    _check_solver_args(reg, tol, max_iter, None)
    if cost.dim() != 2 or min(cost.shape) == 0:
        raise DataError(f"expected a non-empty (n, m) cost matrix, got shape {tuple(cost.shape)}")
    n = cost.shape[0]
    with torch.no_grad():
        res = ot.solve_batch(
            cost.detach()[None], reg, max_iter=max_iter, tol=tol / math.sqrt(n), method="log_sinkhorn", grad="detach"
        )
    return res.plan[0].detach()
