"""SVD layers for Conv1d/2d/3d and Linear: frozen U, Vh buffers, trainable S, three forward forms."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from svfseg.svf.config import MODES
from svfseg.svf.decompose import decompose_weight, rebuild_weight
from svfseg.svf.fold import FoldedBatchNorm, bn_scale_shift, has_trainable_affine, refuse_trainable
from svfseg.svf.tune import TuneCache, time_forms

_CONV_FN: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_CLS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}

# Cost of one elementwise pass per activation element (the S gradient, the input gradient
# through S), in multiply-accumulate units: such passes are memory-bound while convs run as
# GEMMs at tens of MACs per memory access. Fitted to single-thread CPU timings of the
# ResNet-50 layer2-4 shapes (estimated and measured ratios agree within ~5%); only near-ties
# depend on it.
_ELEMENTWISE_COST = 48.0
_MAX_PLANS = 256


def _version(t: torch.Tensor) -> int:
    # Inference tensors carry no version counter; they cannot change in place outside
    # inference mode, so their storage pointer identifies them.
    return -1 if t.is_inference() else t._version


def _accumulation_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if dtype == torch.float64 or device.type == "mps":  # MPS has no float64
        return dtype if dtype == torch.float64 else torch.float32
    return torch.float64 if dtype == torch.float32 else torch.float32


def estimate_costs(
    *,
    groups: int,
    out_per_group: int,
    in_per_group: int,
    rank: int,
    positions: int,
    training: bool,
    input_grad: bool,
) -> dict[str, float]:
    """Estimates the cost of one call of each forward form, in multiply-accumulates.

    "reparam" pays a fixed rebuild (out x rank x in) in the forward and again in the backward
    (projecting the weight gradient on U, Vh), plus the conv and the full weight gradient.
    "factorized" pays the V-conv and the 1x1 U-conv per output position (the U-conv twice:
    forward and backward), one or two elementwise passes for S, and no weight gradient.

    Args:
        groups: conv groups (1 for Linear).
        out_per_group: output channels per group.
        in_per_group: in/groups * prod(kernel).
        rank: kept rank per group.
        positions: batch x output positions (rows for Linear).
        training: whether a graph to S is recorded (a backward will follow).
        input_grad: whether the input needs a gradient.

    Returns:
        {"reparam": cost, "factorized": cost}.
    """
    g, m, n, r, p = groups, out_per_group, in_per_group, rank, positions
    rebuild = g * m * r * n
    conv = p * g * m * n
    conv_v = p * g * r * n
    conv_u = p * g * m * r
    elementwise = _ELEMENTWISE_COST * p * g * r
    if not training:
        # Without a graph the rebuilt weight is cached, and S folds into the U-conv weight.
        return {"reparam": float(conv), "factorized": float(conv_v + conv_u)}
    reparam = 2 * rebuild + 2 * conv + (conv if input_grad else 0)
    factorized = conv_v + 2 * conv_u + elementwise + ((conv_v + elementwise) if input_grad else 0)
    return {"reparam": float(reparam), "factorized": float(factorized)}


def _project(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spatial: int | None) -> torch.Tensor:
    """Per-group channel projection: 1x1 grouped conv (``spatial`` dims) or linear (None)."""
    g, out, inp = weight.shape
    if spatial is None:
        return F.linear(t, weight[0], bias)
    w = weight.reshape(g * out, inp, *(1,) * spatial)
    return _CONV_FN[spatial](t, w, bias, 1, 0, 1, g)


def _channel_dim(t: torch.Tensor, spatial: int | None) -> int:
    return t.ndim - 1 if spatial is None else t.ndim - spatial - 1


def _channel_sum(t: torch.Tensor, spatial: int | None) -> torch.Tensor:
    cd = _channel_dim(t, spatial)
    dims = tuple(d for d in range(t.ndim) if d != cd)
    acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
    return t.sum(dim=dims, dtype=acc) if dims else t.to(acc)


def _channel_view(vec: torch.Tensor, like: torch.Tensor, spatial: int | None) -> torch.Tensor:
    shape = [1] * like.ndim
    shape[_channel_dim(like, spatial)] = -1
    return vec.reshape(shape)


class _Geometry(NamedTuple):
    """Static arguments of the V-projection: conv (``spatial`` dims) or linear (None)."""

    spatial: int | None
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1


def _v_project(x: torch.Tensor, v_weight: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    if geo.spatial is None:
        return F.linear(x, v_weight)
    return _CONV_FN[geo.spatial](x, v_weight, None, geo.stride, geo.padding, geo.dilation, geo.groups)


def _v_input_grad(grad_z: torch.Tensor, x_shape: Sequence[int], v_weight: torch.Tensor, geo: _Geometry):
    if geo.spatial is None:
        return grad_z.matmul(v_weight)
    # Only the input's shape is needed: convolution_backward reads no input values for the
    # input gradient (what torch.nn.grad.conv2d_input does too).
    like = grad_z.new_empty(1).expand(*x_shape)
    zeros = [0] * geo.spatial
    return torch.ops.aten.convolution_backward(
        grad_z, like, v_weight, None, list(geo.stride), list(geo.padding), list(geo.dilation),
        False, zeros, geo.groups, [True, False, False],
    )[0]  # fmt: skip


def _scaled(U: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """U with its rows scaled (a folded BatchNorm's ``a``), or U itself."""
    if scale is None:
        return U
    g, m, _ = U.shape
    return U * scale.to(U.dtype).reshape(g, m, 1)


class _Factorized(torch.autograd.Function):
    """y = U-projection(V-projection(x) * S) + bias, keeping only z = V-projection(x).

    Autograd would keep x for the V-conv (its input gradient needs only Vh), and z and z * S
    for the scaling; here S is folded into the small U weight, dL/dS is one reduction over
    z, the input gradient needs only the shapes, and no weight gradient is formed anywhere.
    A folded BatchNorm's scale comes as ``scale`` (U's rows) and is applied again in the
    backward, so U itself (a buffer) is what is kept, not a scaled copy per layer.
    """

    @staticmethod
    def forward(ctx, x, S, U, scale, v_weight, bias, geo):  # noqa: D102 - autograd.Function protocol
        z = _v_project(x, v_weight, geo)
        ctx.save_for_backward(z, S, U, scale, v_weight)
        ctx.geo = geo
        ctx.x_shape = tuple(x.shape)
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _project(z, _scaled(U, scale) * S.to(U.dtype).unsqueeze(-2), bias, geo.spatial)

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102 - autograd.Function protocol
        z, S, U, scale, v_weight = ctx.saved_tensors
        geo = ctx.geo
        need_x, need_s, _, _, _, need_bias, _ = ctx.needs_input_grad
        grad_x = grad_s = grad_bias = None
        if need_x or need_s:
            # back through the U projection: U^T per group (autocast may hand a half grad)
            grad_zs = _project(grad_y, _scaled(U, scale).mT.to(grad_y.dtype), None, geo.spatial)
            if need_s:
                grad_s = _channel_sum(grad_zs * z.to(grad_zs.dtype), geo.spatial)
                grad_s = grad_s.reshape(S.shape).to(S.dtype)
            if need_x:
                scale_s = _channel_view(S.reshape(-1).to(grad_zs.dtype), grad_zs, geo.spatial)
                grad_z = grad_zs.mul_(scale_s)
                grad_x = _v_input_grad(grad_z, ctx.x_shape, v_weight.to(grad_z.dtype), geo).to(ctx.x_dtype)
        if need_bias:
            grad_bias = _channel_sum(grad_y, geo.spatial).to(ctx.bias_dtype)
        return grad_x, grad_s, None, None, None, grad_bias, None


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast compute dtype for the device, or None when autocast is off."""
    if device_type not in ("cpu", "cuda", "xpu", "mps") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


class SVFLayer(nn.Module):
    """Base of the SVD layers: W = U diag(S) Vh per group, only S (and maybe bias) trains.

    Buffers ``U`` (groups, out/groups, rank) and ``Vh`` (groups, rank, in/groups*prod(k)) are
    frozen; ``S`` (groups, rank) is a Parameter. When no graph to S is needed (no_grad,
    inference_mode, or S frozen) the rebuilt weight is cached until S, U or Vh change
    (tracked through version counters and storage; edits through ``.data`` are not seen,
    call `clear_cache` after those).

    A frozen BatchNorm after the layer can be folded in (`fold_batchnorm`): the layer then
    computes ``a * (W x + bias) + b`` with the BN's ``a`` and ``b`` read on every call, and
    the BN itself becomes a `FoldedBatchNorm` (identity, same state-dict keys).
    """

    def __init__(
        self,
        U: torch.Tensor,
        S: torch.Tensor,
        Vh: torch.Tensor,
        bias: torch.Tensor | None,
        weight_shape: Sequence[int],
        mode: str = "auto",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"{type(self).__name__}: mode must be one of {MODES}, found {mode!r}")
        g, m, r = U.shape
        if S.shape != (g, r) or Vh.shape[:2] != (g, r) or g * m != weight_shape[0]:
            raise ValueError(
                f"{type(self).__name__}: inconsistent factors U {tuple(U.shape)}, "
                f"S {tuple(S.shape)}, Vh {tuple(Vh.shape)} for weight {tuple(weight_shape)}"
            )
        self.register_buffer("U", U)
        self.register_buffer("Vh", Vh)
        self.S = nn.Parameter(S)
        self.register_parameter("bias", nn.Parameter(bias) if bias is not None else None)
        self.weight_shape = tuple(int(v) for v in weight_shape)
        self.mode = mode
        self._cache: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None
        self._plans: dict[tuple, str] = {}
        # A plain tuple, not a submodule: the BN stays registered where it was (its keys).
        self._folded: tuple[FoldedBatchNorm, ...] = ()
        self.tune_cache: TuneCache = TuneCache()

    # --- facts -----------------------------------------------------------------
    @property
    def groups(self) -> int:
        return self.U.shape[0]

    @property
    def rank(self) -> int:
        return self.U.shape[2]

    @property
    def folded_bn(self) -> FoldedBatchNorm | None:
        """The BatchNorm folded into this layer, if any."""
        return self._folded[0] if self._folded else None

    @property
    def weight(self) -> torch.Tensor:
        """The weight the layer applies (BN scale included when folded; cached when no graph is needed)."""
        return self._effective()[0]

    # --- BatchNorm folding -------------------------------------------------------------
    def fold_batchnorm(self, bn: nn.Module, name: str = "bn") -> FoldedBatchNorm:
        """Folds a frozen BatchNorm that follows this layer; returns its identity stand-in.

        The caller puts the returned module where ``bn`` was (`apply_svf` does).

        Args:
            bn: a BatchNorm with running statistics and no trainable affine parameter.
            name: its qualified name, for error messages.

        Returns:
            The `FoldedBatchNorm` sharing ``bn``'s tensors.
        """
        if self._folded:
            raise ValueError(f"fold_bn: {name!r}: this layer already has a folded BatchNorm")
        refuse_trainable(bn, name)
        folded = bn if isinstance(bn, FoldedBatchNorm) else FoldedBatchNorm(bn)
        if folded.num_features != self.weight_shape[0]:
            raise ValueError(
                f"fold_bn: {name!r} has {folded.num_features} features, the layer "
                f"{self.weight_shape[0]} outputs"
            )
        self._folded = (folded,)
        self.clear_cache()
        return folded

    def unfold_batchnorm(self) -> FoldedBatchNorm | None:
        """Detaches the folded BatchNorm (returned) so the layer computes W x + bias again."""
        folded = self.folded_bn
        self._folded = ()
        self.clear_cache()
        return folded

    def _bn_affine(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        bn = self.folded_bn
        if bn is None:
            return None
        if not torch.compiler.is_compiling() and has_trainable_affine(bn):
            raise RuntimeError(
                f"{type(self).__name__}: its folded BatchNorm has trainable affine parameters; "
                "folding needs a frozen BatchNorm (train_bn=false) or fold_bn=false"
            )
        a, b = bn_scale_shift(bn, dtype)
        return a.detach(), b.detach()

    def _factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(U with the BN scale on its rows, bias with the BN folded in), in ``dtype`` if given."""
        U, bias = self.U, self.bias
        affine = self._bn_affine(dtype)
        if dtype is not None:
            U = U.to(dtype)
        if affine is not None:
            a, b = affine
            g, m, _ = U.shape
            U = U * a.to(U.dtype).reshape(g, m, 1)
            bias = b if bias is None else a * bias + b
        if bias is not None and dtype is not None:
            bias = bias.to(dtype)
        return U, bias

    # --- weight rebuild and cache -------------------------------------------------
    def clear_cache(self) -> None:
        """Drops the cached rebuilt weight and the per-shape forward choices."""
        self._cache = None
        self._plans = {}

    def _apply(self, *args, **kwargs):
        # .to()/.half()/.cuda() replace the tensors: the cached weight would be stale.
        self.clear_cache()
        return super()._apply(*args, **kwargs)

    def _needs_graph(self) -> bool:
        return torch.is_grad_enabled() and (self.S.requires_grad or self._factor_matrices_train())

    def _factor_matrices_train(self) -> bool:
        """U or Vh trains (``SVFConfig.train_factors``): only the rebuilt-weight form gives them gradients."""
        return self.U.requires_grad or self.Vh.requires_grad

    def _cache_key(self) -> tuple:
        tensors = [self.S, self.U, self.Vh]
        if self.bias is not None:
            tensors.append(self.bias)
        bn = self.folded_bn
        if bn is not None:
            tensors += [t for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None]
        key = [(t.data_ptr(), _version(t)) for t in tensors]
        return (tuple(key), self.S.device, self.S.dtype, torch.is_inference_mode_enabled())

    def _compute(self, precise: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rebuilds (weight, bias); ``precise`` accumulates in a wider dtype (for cached/merged
        weights, built once: 5x smaller error, half the float32 entries bit-identical)."""
        # Autocast off: the conv casts the result itself, and a half-precision rebuild
        # would add error on top of that cast.
        with torch.autocast(self.U.device.type, enabled=False):
            if not precise:
                U, bias = self._factors()
                return rebuild_weight(U, self.S, self.Vh, self.weight_shape), bias
            dtype = self.U.dtype
            wide = _accumulation_dtype(dtype, self.U.device)
            U, bias = self._factors(wide)
            weight = rebuild_weight(U, self.S.to(wide), self.Vh.to(wide), self.weight_shape)
            return weight.to(dtype), None if bias is None else bias.to(dtype)

    def _effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._needs_graph():
            return self._compute()  # never cached: the graph to S must stay intact
        if torch.compiler.is_compiling():
            return self._compute(precise=True)  # storage pointers are not traceable
        key = self._cache_key()
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        with torch.no_grad():
            weight, bias = self._compute(precise=True)
        self._cache = (key, weight, bias)
        return weight, bias

    # --- forward selection --------------------------------------------------------
    def _positions(self, x: torch.Tensor) -> int:
        raise NotImplementedError

    def _estimate(self, x: torch.Tensor) -> str:
        g, m, r = self.U.shape
        costs = estimate_costs(
            groups=g, out_per_group=m, in_per_group=self.Vh.shape[2], rank=r,
            positions=self._positions(x), training=True, input_grad=x.requires_grad,
        )  # fmt: skip
        return min(costs, key=costs.get)

    def _tune_key(self, x: torch.Tensor) -> tuple:
        """What decides the faster form: the layer's geometry and the input's shape, dtype, device."""
        return (
            type(self).__name__, self.weight_shape, self.rank, self._geometry(), self.bias is not None,
            self.folded_bn is not None, tuple(x.shape), x.dtype, str(x.device), x.requires_grad,
            tuple(x.stride()), _autocast_dtype(x.device.type),
        )  # fmt: skip

    def choose_mode(self, x: torch.Tensor) -> str:
        """Returns the forward form used for input ``x`` ("reparam" or "factorized").

        "auto" picks the cheaper form by a cost estimate; "tune" times both forms on the first
        training call per (layer geometry, input shape, dtype, device) and keeps the faster
        (shared by the layers of one `apply_svf` call). Without a graph to S both use the
        cached rebuilt weight, exactly the plain layer's cost.
        """
        if self.mode in ("reparam", "factorized") and not self._factor_matrices_train():
            return self.mode
        if not self._needs_graph() or self._factor_matrices_train():
            return "reparam"
        key = (tuple(x.shape), x.device.type, x.dtype, x.requires_grad)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        if torch.compiler.is_compiling():
            return self._estimate(x)  # no timing or cache writes inside a traced graph
        if self.mode == "tune":
            tune_key = self._tune_key(x)
            entry = self.tune_cache.get(tune_key)
            if entry is None:
                entry = time_forms(self, x)
                self.tune_cache.put(tune_key, entry)
            plan = entry["plan"]
        else:
            plan = self._estimate(x)
        if len(self._plans) >= _MAX_PLANS:  # many input sizes (e.g. multi-scale): stay bounded
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.choose_mode(x) == "factorized":
            return self._forward_factorized(x)
        return self._forward_reparam(x)

    def _geometry(self) -> _Geometry:
        raise NotImplementedError

    def _v_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _forward_reparam(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _run_factorized(self, x: torch.Tensor, geo: _Geometry) -> torch.Tensor:
        """The factorized form on an already padded input."""
        if self._needs_graph():
            dtype = _autocast_dtype(x.device.type)
            U, v_weight, bias = self.U, self._v_weight(), self.bias
            affine = self._bn_affine()
            scale = None
            if affine is not None:
                scale, shift = affine
                bias = shift if bias is None else scale * bias + shift
            if dtype is not None:  # cast here so S stays float32 and autograd casts the grads back
                x, U, v_weight = x.to(dtype), U.to(dtype), v_weight.to(dtype)
                bias = None if bias is None else bias.to(dtype)
            elif x.dtype != U.dtype:
                raise TypeError(f"{type(self).__name__}: input dtype {x.dtype} differs from the layer's {U.dtype}")
            return _Factorized.apply(x, self.S, U, scale, v_weight, bias, geo)
        U, bias = self._factors()
        z = _v_project(x, self._v_weight(), geo)
        return _project(z, U * self.S.unsqueeze(-2), bias, geo.spatial)

    def to_plain(self, fold_bn: bool = False) -> nn.Module:
        """Returns the equivalent plain layer.

        Args:
            fold_bn: with a folded BatchNorm, give the folded layer (weight scaled by ``a``,
                bias ``a * bias + b``; the BN is then dropped); otherwise W = U diag(S) Vh and
                the original bias, for the BN to be restored after it.
        """
        raise NotImplementedError

    def _plain_params(self, fold_bn: bool) -> tuple[nn.Parameter, nn.Parameter | None]:
        folded = None if fold_bn else self.unfold_batchnorm()
        try:
            with torch.no_grad():
                weight, bias = self._compute(precise=True)
        finally:
            if folded is not None:
                self._folded = (folded,)
                self.clear_cache()
        weight = nn.Parameter(weight.contiguous(), requires_grad=self.S.requires_grad or self._factor_matrices_train())
        if bias is not None:
            trained = self.bias is not None and self.bias.requires_grad
            bias = nn.Parameter(bias.detach().clone(), requires_grad=trained)
        return weight, bias


def _explicit_padding(
    padding: str | tuple[int, ...], kernel_size: tuple[int, ...], dilation: tuple[int, ...]
) -> list[int]:
    """Padding in F.pad order (last dim first, (before, after) each), as nn.ConvNd pads."""
    pairs = []
    for i, (k, d) in enumerate(zip(kernel_size, dilation)):
        if padding == "valid":
            pairs.append((0, 0))
        elif padding == "same":
            total = d * (k - 1)
            pairs.append((total // 2, total - total // 2))
        else:
            pairs.append((padding[i], padding[i]))
    return [v for pair in reversed(pairs) for v in pair]


class _SVFConvNd(SVFLayer):
    """SVD form of nn.ConvNd; stride, padding (any padding_mode), dilation and groups kept."""

    dim: int = 2

    def __init__(
        self,
        U: torch.Tensor,
        S: torch.Tensor,
        Vh: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, ...],
        stride: tuple[int, ...],
        padding: str | tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
        padding_mode: str = "zeros",
        mode: str = "auto",
    ) -> None:
        shape = (out_channels, in_channels // groups, *kernel_size)
        super().__init__(U, S, Vh, bias, shape, mode)
        if U.shape[0] != groups:
            raise ValueError(f"{type(self).__name__}: U has {U.shape[0]} groups, conv has {groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation = tuple(dilation)
        self.padding_mode = padding_mode
        self._pad = _explicit_padding(self.padding, self.kernel_size, self.dilation)

    @classmethod
    def from_conv(
        cls, conv: nn.Module, mode: str = "auto", svd_dtype: torch.dtype = torch.float64
    ) -> "_SVFConvNd":
        """Decomposes an nn.ConvNd exactly (full rank, per group).

        Args:
            conv: the nn.Conv1d/2d/3d to decompose (left unchanged).
            mode: forward form, see `SVFConfig.mode`.
            svd_dtype: dtype of the SVD computation.

        Returns:
            The SVD layer, on the conv's device and dtype.
        """
        U, S, Vh = decompose_weight(conv.weight, conv.groups, svd_dtype)
        bias = None if conv.bias is None else conv.bias.detach().clone()
        layer = cls(
            U, S, Vh, bias,
            in_channels=conv.in_channels, out_channels=conv.out_channels,
            kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, padding_mode=conv.padding_mode, mode=mode,
        )  # fmt: skip
        return layer.train(conv.training)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, rank={self.rank}, mode={self.mode}"
        )
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + ("" if self.bias is not None else ", bias=False")

    def _padded(self, x: torch.Tensor) -> tuple[torch.Tensor, str | tuple[int, ...]]:
        if self.padding_mode == "zeros":
            return x, self.padding
        return F.pad(x, self._pad, mode=self.padding_mode), (0,) * self.dim

    def _positions(self, x: torch.Tensor) -> int:
        spatial = x.shape[-self.dim :]
        batch = math.prod(x.shape[: -self.dim - 1])
        out = 1
        for i, size in enumerate(spatial):
            before, after = self._pad[2 * (self.dim - 1 - i)], self._pad[2 * (self.dim - 1 - i) + 1]
            eff = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            out *= max((size + before + after - eff) // self.stride[i] + 1, 0)
        return batch * out

    def _forward_reparam(self, x: torch.Tensor) -> torch.Tensor:
        x, padding = self._padded(x)
        weight, bias = self._effective()
        return _CONV_FN[self.dim](x, weight, bias, self.stride, padding, self.dilation, self.groups)

    def _geometry(self) -> _Geometry:
        """Conv geometry with integer padding (string or non-zero padding is applied by `_forward_factorized`)."""
        before, after = self._pad[0::2][::-1], self._pad[1::2][::-1]
        padding = tuple(before) if self.padding_mode == "zeros" and before == after else (0,) * self.dim
        return _Geometry(self.dim, self.stride, padding, self.dilation, self.groups)

    def _v_weight(self) -> torch.Tensor:
        g, _, r = self.U.shape
        return self.Vh.reshape(g * r, self.in_channels // g, *self.kernel_size)

    def _forward_factorized(self, x: torch.Tensor) -> torch.Tensor:
        geo = self._geometry()
        if any(self._pad) and not any(geo.padding):  # asymmetric "same" or reflect/replicate/circular
            x = F.pad(x, self._pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        if x.ndim == self.dim + 1:  # unbatched input: the input-gradient kernel wants a batch dim
            return self._run_factorized(x.unsqueeze(0), geo).squeeze(0)
        return self._run_factorized(x, geo)

    def to_plain(self, fold_bn: bool = False) -> nn.Module:  # noqa: D102 - documented in SVFLayer
        weight, bias = self._plain_params(fold_bn)
        conv = torch.nn.utils.skip_init(
            _CONV_CLS[self.dim], self.in_channels, self.out_channels, self.kernel_size,
            stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
            bias=bias is not None, padding_mode=self.padding_mode,
            device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        conv.weight = weight
        conv.bias = bias
        return conv.train(self.training)


class SVFConv1d(_SVFConvNd):
    """SVD form of nn.Conv1d."""

    dim = 1


class SVFConv2d(_SVFConvNd):
    """SVD form of nn.Conv2d."""

    dim = 2


class SVFConv3d(_SVFConvNd):
    """SVD form of nn.Conv3d."""

    dim = 3


class SVFLinear(SVFLayer):
    """SVD form of nn.Linear (a single group)."""

    def __init__(
        self,
        U: torch.Tensor,
        S: torch.Tensor,
        Vh: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        in_features: int,
        out_features: int,
        mode: str = "auto",
    ) -> None:
        super().__init__(U, S, Vh, bias, (out_features, in_features), mode)
        self.in_features = in_features
        self.out_features = out_features

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, mode: str = "auto", svd_dtype: torch.dtype = torch.float64
    ) -> "SVFLinear":
        """Decomposes an nn.Linear exactly (full rank).

        Args:
            linear: the layer to decompose (left unchanged).
            mode: forward form, see `SVFConfig.mode`.
            svd_dtype: dtype of the SVD computation.

        Returns:
            The SVD layer, on the linear layer's device and dtype.
        """
        U, S, Vh = decompose_weight(linear.weight, 1, svd_dtype)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        layer = cls(
            U, S, Vh, bias, in_features=linear.in_features, out_features=linear.out_features,
            mode=mode,
        )  # fmt: skip
        return layer.train(linear.training)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, mode={self.mode}, bias={self.bias is not None}"
        )

    def _positions(self, x: torch.Tensor) -> int:
        return math.prod(x.shape[:-1])

    def _forward_reparam(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._effective()
        return F.linear(x, weight, bias)

    def _geometry(self) -> _Geometry:
        return _Geometry(None)

    def _v_weight(self) -> torch.Tensor:
        return self.Vh[0]

    def _forward_factorized(self, x: torch.Tensor) -> torch.Tensor:
        return self._run_factorized(x, self._geometry())

    def to_plain(self, fold_bn: bool = False) -> nn.Module:  # noqa: D102 - documented in SVFLayer
        weight, bias = self._plain_params(fold_bn)
        linear = torch.nn.utils.skip_init(
            nn.Linear, self.in_features, self.out_features, bias=bias is not None,
            device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        linear.weight = weight
        linear.bias = bias
        return linear.train(self.training)


def svf_layer_from(
    module: nn.Module, mode: str = "auto", svd_dtype: torch.dtype = torch.float64
) -> SVFLayer:
    """Decomposes a supported plain layer (exact type nn.Conv1d/2d/3d or nn.Linear).

    Args:
        module: the layer.
        mode: forward form.
        svd_dtype: dtype of the SVD computation.

    Returns:
        The matching SVF layer.
    """
    kind = type(module)
    if kind is nn.Linear:
        return SVFLinear.from_linear(module, mode, svd_dtype)
    for dim, conv_cls in _CONV_CLS.items():
        if kind is conv_cls:
            return _SVF_CONV_BY_DIM[dim].from_conv(module, mode, svd_dtype)
    raise TypeError(
        f"expected nn.Conv1d/2d/3d or nn.Linear (exact type), found {kind.__module__}.{kind.__qualname__}"
    )


SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_SVF_CONV_BY_DIM: dict[int, type[_SVFConvNd]] = {1: SVFConv1d, 2: SVFConv2d, 3: SVFConv3d}
