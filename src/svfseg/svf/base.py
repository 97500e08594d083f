"""SVFLayer, the base of the SVD layers: frozen U, Vh buffers, trainable S, BatchNorm folding, two forward forms."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from svfseg.svf.config import MODES
from svfseg.svf.factorized import Factorized, Geometry, project, v_project
from svfseg.svf.fold import FoldedBatchNorm, bn_scale_shift, has_trainable_affine, refuse_trainable
from svfseg.svf.forms import autocast_dtype, estimate_form
from svfseg.svf.plan import FormsPlan
from svfseg.svf.weight_cache import WeightCache, rebuild

#: Inputs a layer remembers its plan's answer for (many input sizes, e.g. multi-scale: stay bounded).
_MAX_MEMO = 256


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
        self._weights = WeightCache()
        self._form_memo: dict[tuple, str] = {}
        # A plain tuple, not a submodule: the BN stays registered where it was (its keys).
        self._folded: tuple[FoldedBatchNorm, ...] = ()
        # mode "auto": where the training form comes from (`apply_svf` gives its layers one shared plan)
        self._forms_plan = FormsPlan()
        self._per_sample: torch.Tensor | None = None  # set only inside `forward_per_sample`

    # --- facts -----------------------------------------------------------------
    @property
    def groups(self) -> int:
        return self.U.shape[0]

    @property
    def rank(self) -> int:
        return self.U.shape[2]

    @property
    def forms_plan(self) -> FormsPlan:
        """The forms plan this layer's mode "auto" follows (shared by the layers of one `apply_svf` call)."""
        return self._forms_plan

    @forms_plan.setter
    def forms_plan(self, plan: FormsPlan) -> None:
        if not isinstance(plan, FormsPlan):
            raise TypeError(f"{type(self).__name__}.forms_plan: expected a FormsPlan, found {type(plan).__name__}")
        self._forms_plan = plan
        self._form_memo = {}

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
        """Drops the cached rebuilt weight and the remembered per-input forms (the plan stays)."""
        self._weights.clear()
        self._form_memo = {}

    def _apply(self, *args, **kwargs):
        # .to()/.half()/.cuda() replace the tensors: the cached weight would be stale.
        self.clear_cache()
        return super()._apply(*args, **kwargs)

    def _needs_graph(self) -> bool:
        return torch.is_grad_enabled() and (self.S.requires_grad or self._factor_matrices_train())

    def _factor_matrices_train(self) -> bool:
        """U or Vh trains (``SVFConfig.train_factors``): only the rebuilt-weight form gives them gradients."""
        return self.U.requires_grad or self.Vh.requires_grad

    def _effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._weights.weight(self, self._needs_graph())

    # --- forward selection --------------------------------------------------------
    def _positions(self, x: torch.Tensor) -> int:
        raise NotImplementedError

    def choose_mode(self, x: torch.Tensor) -> str:
        """Returns the forward form used for input ``x`` ("reparam" or "factorized").

        "auto" (and its older name "tune") follows the layer's `forms_plan`: the form measured
        fastest for this geometry and input, timed on the first training call when the plan is
        open, the cost model where the plan is frozen and lacks it or under a torch.compile trace.
        Without a graph to S every mode uses the cached rebuilt weight, the plain layer's cost.
        """
        if not self._needs_graph() or self._factor_matrices_train():
            # no graph to S (evaluation, frozen S): whatever the mode, the cached rebuilt weight is
            # one conv, the factorized form two; trained U / Vh get gradients only through the rebuild
            return "reparam"
        if self.mode in ("reparam", "factorized"):
            return self.mode
        memo = (tuple(x.shape), tuple(x.stride()), x.dtype, x.device.type, x.requires_grad,
                autocast_dtype(x.device.type))  # fmt: skip
        form = self._form_memo.get(memo)
        if form is not None:
            return form
        if torch.compiler.is_compiling():
            return estimate_form(self, x)  # no timing, logging or plan writes inside a traced graph
        form = self._forms_plan.form_for(self, x)
        if len(self._form_memo) >= _MAX_MEMO:
            self._form_memo = {}
        self._form_memo[memo] = form
        return form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.choose_mode(x) == "factorized":
            return self._forward_factorized(x)
        return self._forward_reparam(x)

    def _geometry(self) -> Geometry:
        raise NotImplementedError

    def geometry_text(self) -> str:
        """The layer's geometry as text (a forms plan's key; the mode is not part of it)."""
        raise NotImplementedError

    def _factor_text(self) -> str:
        return (f"rank={self.rank}, bias={int(self.bias is not None)}, "
                f"bn={int(self.folded_bn is not None)}")  # fmt: skip

    def _v_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _forward_reparam(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_per_sample(self, x: torch.Tensor, singular_values: torch.Tensor) -> torch.Tensor:
        """The layer with each sample's own singular values: ``y_n = U diag(s_n) Vh x_n + bias``.

        For training many copies of one model at once (test-time adaptation of a batch of episodes,
        each with its own singular values) without copying the layer: ``singular_values`` stands
        in for ``S``, and gradients reach it rather than ``S``. Computed in the factorized form
        (V-projection, per-sample scale, U-projection); a folded BatchNorm applies as usual.

        Args:
            x: A batched input (N, ...), as :meth:`forward` takes it.
            singular_values: (N, groups, rank), or (groups, rank) shared by every sample.
        """
        n = x.shape[0]
        per = singular_values.expand(n, *self.S.shape) if singular_values.dim() == self.S.dim() else singular_values
        if tuple(per.shape) != (n, *self.S.shape):
            raise ValueError(f"{type(self).__name__}.forward_per_sample: expected singular values of shape "
                             f"({n}, {', '.join(map(str, self.S.shape))}), found {tuple(singular_values.shape)}")
        self._per_sample = per
        try:
            return self._forward_factorized(x)
        finally:
            self._per_sample = None

    def _run_per_sample(self, x: torch.Tensor, geo: Geometry) -> torch.Tensor:
        U, bias = self._factors()
        z = v_project(x, self._v_weight(), geo)
        scale = self._per_sample.reshape(z.shape[0], -1).to(z.dtype)
        shape = [z.shape[0]] + [1] * (z.ndim - 1)
        shape[1 if geo.spatial is not None else -1] = scale.shape[1]
        return project(z * scale.reshape(shape), U, bias, geo.spatial)

    def _run_factorized(self, x: torch.Tensor, geo: Geometry) -> torch.Tensor:
        """The factorized form on an already padded input."""
        if self._per_sample is not None:
            return self._run_per_sample(x, geo)
        if self._needs_graph():
            dtype = autocast_dtype(x.device.type)
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
            return Factorized.apply(x, self.S, U, scale, v_weight, bias, geo)
        U, bias = self._factors()
        z = v_project(x, self._v_weight(), geo)
        return project(z, U * self.S.unsqueeze(-2), bias, geo.spatial)

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
                weight, bias = rebuild(self, precise=True)
        finally:
            if folded is not None:
                self._folded = (folded,)
                self.clear_cache()
        weight = nn.Parameter(weight.contiguous(), requires_grad=self.S.requires_grad or self._factor_matrices_train())
        if bias is not None:
            trained = self.bias is not None and self.bias.requires_grad
            bias = nn.Parameter(bias.detach().clone(), requires_grad=trained)
        return weight, bias
