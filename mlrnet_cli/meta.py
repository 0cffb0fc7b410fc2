"""The bi-level meta step of MW-Net, MLRNet and MLC (paper §3.2, §3.4, Algorithm 1), on any unmodified HF classifier.

One call of :func:`meta_step` does, on a training mini-batch of n rows and a meta mini-batch of m clean rows:

1. eqs. 4/8, the virtual step ``ŵ = w − α Σ_i c_i ∇L_i(w)`` over the selected parameters (``--meta-params``),
   with ``c_i = v_i / n`` (paper) or ``c_i = v_i / Σ_j v_j`` (MW-Net's in-batch normalisation,
   ``normalize_weights``);
2. eq. 5, the meta loss ``(1/m) Σ_j CE(F(x_j; ŵ), y_j)`` evaluated with ``torch.func.functional_call`` (the
   model is never rewritten), and one step of the meta optimiser on θ;
3. eqs. 6/9, the weighted training loss ``Σ_i c_i(θ_new) L_i(w)``, returned with its graph for the caller's
   optimiser (the real update reuses the training forward, so it sees the same dropout masks); with
   ``clean_share`` S > 0 (``--meta-share``, our extension) plus ``S · mean CE`` of the clean batch, whose rows run
   in the same real forward (:func:`forward_with_clean`, :func:`add_clean_share`), or, with ``--meta-share-at
   w-hat``, from the meta loss's gradient at ŵ that step 2 computed (:func:`add_clean_share_gradient`).

The θ gradient is exact in both modes. Because w does not depend on θ, the chain rule gives
``dL_meta/dθ = −α Σ_i (∇L_meta(ŵ) · ∇L_i(w)) ∂c_i/∂θ``. ``mode="jvp"`` (default) gets the n directional
derivatives ``s_i = ∇L_i(w) · ∇L_meta(ŵ)`` from one forward-mode pass at w that replays the training forward's
dropout masks; it builds no second-order graph. ``mode="unrolled"`` is the textbook version: ŵ(θ) is built with
``create_graph=True`` and the meta loss is backpropagated through it. On MiniLM-L6 (CPU, ``--meta-params all``)
both took about the same time, and ``jvp`` needed about 20 % less peak memory (``benchmarks/meta_step.py``).

:func:`mlc_step` is Meta Label Correction's step (Zheng et al. 2021) on the same machinery: the meta-net is a
label-correction network that gives soft labels instead of weights, the virtual step and the real step train on
them (see its docstring for its exact θ gradient).

Differentiated forwards run under the SDPA MATH kernel: on CPU, HF's default ``sdpa`` attention picks a flash
kernel with no double backward and no forward-mode AD.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from mlrnet_cli.configs import MetaShareAt, parse_meta_params
from mlrnet_cli.distributed import ForwardModule
from mlrnet_cli.errors import ConfigError
from mlrnet_cli.modeling import eval_mode, math_attention

#: forward(model, inputs) -> (head-input features [B, H], logits [B, C]), one pass.
ForwardFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
#: head(model, features) -> logits: the classification head alone on head-input features.
HeadFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ClassifierFns:
    """How to run a classifier: the full forward, and (optional) the head alone, used by the cheap head path."""

    forward: ForwardFn
    head: HeadFn | None = None
    head_prefix: str | None = None  # parameter-name prefix of the head module, e.g. "classifier."


@dataclass
class StepBatch:
    """A mini-batch: model inputs (``input_ids``/``attention_mask`` or cached ``features``), labels, curves I_i."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    curves: torch.Tensor | None = None


@dataclass
class MetaStepOutput:
    """What one step produced: the weighted loss (with graph), per-sample losses and weights (detached)."""

    loss: torch.Tensor
    losses: torch.Tensor
    weights: torch.Tensor
    meta_loss: torch.Tensor | None  #: detached 0-d tensor (no host sync per step); ``float()`` it when needed


def resolve_meta_params(model: nn.Module, spec: str, head_prefix: str | None) -> list[str]:
    """Names of the trainable parameters the virtual step differentiates through.

    ``all``: every trainable parameter (the exact paper method). ``head``: those of the classification head.
    ``last-K``: every trainable parameter from the first one of the K-th last encoder layer onwards, in
    registration order (so BERT's pooler and DistilBERT's pre-classifier, which sit between the last layer
    and the head, are included). The others are held constant in the virtual step.
    """
    kind, k = parse_meta_params(spec)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if kind == "all":
        names = trainable
    elif kind == "head":
        if not head_prefix:
            raise ConfigError("--meta-params head needs a model whose classification head is known")
        names = [n for n in trainable if n.startswith(head_prefix)]
    else:
        # the encoder's layer stack: the longest ModuleList in the model (BERT/RoBERTa `encoder.layer`, ...)
        stacks = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList)]
        if not stacks:
            raise ConfigError(f"--meta-params {spec}: the model has no layer stack")
        stack_name, stack = max(stacks, key=lambda s: len(s[1]))
        start_layer = max(len(stack) - k, 0)
        first = f"{stack_name}.{start_layer}." if stack_name else f"{start_layer}."
        all_names = [n for n, _ in model.named_parameters()]
        start = next((i for i, n in enumerate(all_names) if n.startswith(first)), 0)  # no such layer: all
        keep = set(all_names[start:])
        if head_prefix:
            keep |= {n for n in all_names if n.startswith(head_prefix)}
        names = [n for n in trainable if n in keep]
    if not names:
        raise ConfigError(f"--meta-params {spec} selects no trainable parameter")
    return names


def weight_coefficients(weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """c_i of eqs. 4/6: v_i / n (paper), or v_i / Σ_j v_j (MW-Net's in-batch normalisation) when it is > 0."""
    if not normalize:
        return weights / weights.numel()
    total = weights.sum()
    # MW-Net's guard: an all-zero batch keeps its zeros rather than dividing by zero. torch.where on the
    # divisor (not on the quotient: that would leak NaN gradients) keeps it on the device, no host sync.
    return weights / torch.where(total > 0, total, torch.ones_like(total))


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample, at least in float32 even under bf16 autocast (never the HF model's mean loss)."""
    return F.cross_entropy(_upcast(logits), labels, reduction="none")


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _call_with(model: nn.Module, fn: Callable[..., Any], params: Mapping[str, torch.Tensor], arg: object) -> Any:
    """``fn(model, arg)`` with ``params`` in place of the model's own parameters, for this one call."""
    return torch.func.functional_call(ForwardModule(model, fn), {f"model.{k}": v for k, v in params.items()}, (arg,))


@contextlib.contextmanager
def _replay_rng(snapshot: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> Iterator[None]:
    """Re-run code with the RNG as it was at ``snapshot`` (same dropout masks), leaving the outer RNG untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(snapshot[0])
        if snapshot[1] is not None:
            torch.cuda.set_rng_state(snapshot[1], device)
        yield


#: the real step's forward: one input dict, or a list of them whose outputs are concatenated (one DDP forward)
RealForward = Callable[[Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]]], tuple[torch.Tensor, ...]]


def forward_with_clean(
    forward: RealForward, batch: StepBatch, clean: StepBatch | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The real step's one forward over the training rows and, when ``clean`` is given, the clean rows after them:
    (training features, training logits, clean logits or None).

    One call: under torchrun ``forward`` is the DDP module, which allows one forward per backward. The training
    rows run first, so their dropout masks are those of a forward over them alone (the jvp mode replays it)."""
    if clean is None:
        features, logits = forward(batch.inputs)
        return features, logits, None
    n = batch.labels.shape[0]
    features, logits = forward([batch.inputs, clean.inputs])
    return features[:n], logits[:n], logits[n:]


def add_clean_share(
    loss: torch.Tensor, clean_logits: torch.Tensor | None, clean: StepBatch | None, share: float
) -> torch.Tensor:
    """``--meta-share S``, our extension of eqs. 6/9: the real step's loss plus S × the mean cross-entropy of the
    clean rows (MLC's reference code trains on its clean batch too). ``loss`` itself when there is none."""
    if clean_logits is None or clean is None or not share:
        return loss
    return loss + share * F.cross_entropy(_upcast(clean_logits), clean.labels).to(loss.dtype)


def add_clean_share_gradient(
    loss: torch.Tensor,
    meta_loss: torch.Tensor,
    params: Sequence[torch.Tensor],
    g_meta: Sequence[torch.Tensor],
    share: float,
) -> torch.Tensor:
    """``--meta-share-at w-hat``: ``loss`` plus S × a term whose value is the meta loss at ŵ (eq. 5) and whose
    gradient is ``g_meta``, that loss's gradient at ŵ (already computed for θ), in place of a pass at w."""
    # a loss term, not a write to .grad: the optimiser, DDP's all-reduce and a gradient scaler see it as they see
    # the rest of the loss, and the logged loss is what the pass at w would log
    term = sum(_GradientTerm.apply(p, g.to(p.dtype)) for p, g in zip(params, g_meta, strict=True))
    return loss + share * (meta_loss.detach() + term).to(loss.dtype)


class _GradientTerm(torch.autograd.Function):
    """A zero whose gradient with respect to ``p`` is ``g``: one multiply in the backward, nothing in the forward
    (``(p − p.detach()) · g`` gives the same gradient at the cost of three passes over every parameter)."""

    @staticmethod
    def forward(ctx: Any, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g)
        return p.new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (g,) = ctx.saved_tensors
        return grad_out * g, None


class _CleanShare:
    """How one step adds the clean rows' term of ``--meta-share`` S: by a pass at w, or from g_meta at ŵ."""

    def __init__(
        self, clean: StepBatch | None, share: float, at: str, meta: StepBatch | None, updates_meta: bool
    ) -> None:
        choices = [a.value for a in MetaShareAt]
        if at not in choices:
            raise ConfigError(f"--meta-share-at {at!r} is not one of {', '.join(choices)}")
        self.share = share if clean is not None else 0.0
        self.from_grad = bool(self.share) and at == MetaShareAt.w_hat.value and updates_meta and meta is not None
        if self.from_grad and clean is not meta:
            raise ConfigError(
                "--meta-share-at w-hat reuses the meta loss's gradient: the clean batch must be the meta batch"
            )
        self.real_batch = clean if self.share and not self.from_grad else None
        self.reused: tuple[torch.Tensor, list[str], list[torch.Tensor]] | None = None  # (L_meta(ŵ), ŵ names, g_meta)

    def reuse(self, rp: _RealPass, meta_loss: torch.Tensor, g_meta: list[torch.Tensor]) -> None:
        """Keep g_meta = ∇L_meta(ŵ) when this step takes the clean term from it (ŵ must hold every trainable
        parameter: the clean rows train the whole classifier)."""
        if not self.from_grad:
            return
        trainable = {n for n, p in rp.model.named_parameters() if p.requires_grad}
        if not trainable <= set(rp.names):
            raise ConfigError("--meta-share-at w-hat needs --meta-params all: g_meta covers only ŵ's parameters")
        self.reused = meta_loss, rp.names, g_meta

    def add(self, loss: torch.Tensor, rp: _RealPass) -> torch.Tensor:
        """The real step's loss with the clean term (eqs. 6/9 plus our extension); ``loss`` when S = 0."""
        if self.reused is not None:
            meta_loss, names, g_meta = self.reused
            params = dict(rp.model.named_parameters())
            return add_clean_share_gradient(loss, meta_loss, [params[n] for n in names], g_meta, self.share)
        return add_clean_share(loss, rp.clean_logits, self.real_batch, self.share)


class _RealPass:
    """The real step's forward of meta_step / mlc_step, and what their meta update needs to know about it."""

    def __init__(
        self,
        model: nn.Module,
        fns: ClassifierFns,
        batch: StepBatch,
        meta_params: Sequence[str],
        mode: str,
        real_forward: RealForward | None,
        clean: StepBatch | None,
    ) -> None:
        """The RNG snapshot (the jvp mode replays the dropout masks), then the one real forward over the training
        rows and, with ``--meta-share``, the clean rows after them."""
        if mode not in ("jvp", "unrolled"):
            raise ConfigError(f"unknown meta-step mode {mode!r}")
        self.model, self.fns, self.batch, self.unrolled = model, fns, batch, mode == "unrolled"
        self.names = list(meta_params)  # the parameters of ŵ (``--meta-params``)
        device = batch.labels.device
        self.rng = torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        prefix = fns.head_prefix
        self.head_only = fns.head is not None and bool(prefix) and all(n.startswith(prefix) for n in self.names)
        # the MATH kernel only where attention is differentiated twice or in forward mode: with only the head in ŵ
        # the encoder is differentiated once (the real step), so it keeps the default (faster) kernel
        self.attention = contextlib.nullcontext if self.head_only else math_attention
        # without a real_forward, the plain one-process forward (what distributed.training_forward gives then)
        forward = ForwardModule(model, fns.forward).forward if real_forward is None else real_forward
        with self.attention():
            self.features, self.logits, self.clean_logits = forward_with_clean(forward, batch, clean)

    def meta_logits(self, params: Mapping[str, torch.Tensor], meta: StepBatch, dropout: bool) -> torch.Tensor:
        """Logits of the meta batch at ŵ (eq. 5). With only head parameters in ŵ the encoder runs without a graph.

        ``dropout``: leave the model in its own (training) mode; otherwise it runs in eval mode.
        """
        model, fns = self.model, self.fns
        with contextlib.nullcontext() if dropout else eval_mode(model):
            if self.head_only:
                assert fns.head is not None
                with torch.no_grad():
                    features, _ = fns.forward(model, meta.inputs)
                # fns.forward may run under bf16 autocast (CUDA); the head at ŵ runs outside it, in ŵ's dtype
                return _call_with(model, fns.head, params, features.detach().to(next(iter(params.values())).dtype))
            return _call_with(model, fns.forward, params, meta.inputs)[1]

    def forward_tangent(
        self, tangents: Sequence[torch.Tensor], out: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor | None:
        """The derivative of ``out(training logits)`` at w along ``tangents`` (one per ŵ parameter), in one
        forward-mode pass: the training forward replayed with its dropout masks, or the head alone on the real
        forward's features. None when the selected parameters do not reach it."""
        model, params = self.model, dict(self.model.named_parameters())
        with torch.no_grad(), fwAD.dual_level():
            duals = {
                n: fwAD.make_dual(params[n].detach(), t.to(params[n].dtype))
                for n, t in zip(self.names, tangents, strict=True)
            }
            if self.head_only:
                assert self.fns.head is not None
                # the real forward ran under bf16 autocast on CUDA; this replay runs outside it, in the head's dtype
                logits = _call_with(model, self.fns.head, duals, self.features.detach().to(params[self.names[0]].dtype))
            else:
                with _replay_rng(self.rng, self.batch.labels.device):
                    _, logits = _call_with(model, self.fns.forward, duals, self.batch.inputs)
            tangent = fwAD.unpack_dual(out(logits)).tangent
        return None if tangent is None else tangent.detach()

    def meta_update(
        self,
        opt: torch.optim.Optimizer,
        theta: list[torch.Tensor],
        meta: StepBatch,
        train_loss: torch.Tensor,
        coeffs: torch.Tensor | None,
        along: Callable[[list[torch.Tensor]], Sequence[torch.Tensor | None]],
        alpha: float,
        meta_dropout: bool,
        meta_grad_scale: float,
        reduce_meta_grads: Callable[[list[torch.Tensor]], None] | None,
        share: _CleanShare,
    ) -> torch.Tensor:
        """The virtual step ŵ = w − α ∇_w Σ_i c_i train_loss_i (eqs. 4/8; ``coeffs`` None: a scalar loss), the meta
        loss at ŵ (eq. 5) and one optimiser step of the meta-net θ on its exact gradient (the other arguments as for
        :func:`meta_step`). Returns the meta loss, detached; ``share`` keeps ``g_meta = ∇L_meta(ŵ)`` when the step
        takes ``--meta-share``'s term from it (the unrolled mode computes g_meta only then; jvp needs it anyway).

        ``unrolled``: ŵ(θ) is built with ``create_graph=True`` and the meta loss is backpropagated through it. jvp:
        ŵ is a detached leaf and ``along(g_meta)`` turns ``g_meta`` into the θ gradient."""
        model, names, unrolled = self.model, self.names, self.unrolled
        params = dict(model.named_parameters())
        selected = [params[n] for n in names]
        with self.attention():
            c = coeffs if unrolled or coeffs is None else coeffs.detach()
            grads = torch.autograd.grad(
                train_loss, selected, grad_outputs=c, create_graph=unrolled, retain_graph=True, allow_unused=True
            )
            stepped = [p if g is None else p - alpha * g for p, g in zip(selected, grads, strict=True)]
            if not unrolled:  # jvp: ŵ is a leaf, θ's gradient comes from along(g_meta)
                stepped = [w.detach().requires_grad_(True) for w in stepped]
            w_hat = dict(zip(names, stepped, strict=True))
            meta_loss = F.cross_entropy(_upcast(self.meta_logits(w_hat, meta, meta_dropout)), meta.labels)
            if unrolled:
                # one backward gives θ's gradient and, when asked, g_meta (ŵ's entries are non-leaf tensors here)
                inputs = [*theta, *stepped] if share.from_grad else theta
                grads = torch.autograd.grad(meta_loss, inputs, retain_graph=True, materialize_grads=True)
                theta_grads, g_meta = grads[: len(theta)], list(grads[len(theta) :])
            else:
                # a ŵ parameter the meta loss does not reach gets a zero gradient, not None
                g_meta = list(torch.autograd.grad(meta_loss, stepped, materialize_grads=True))
                theta_grads = along(g_meta)
        opt.zero_grad(set_to_none=True)
        for p, g in zip(theta, theta_grads, strict=True):
            p.grad = torch.zeros_like(p) if g is None else g.detach() * meta_grad_scale
        if reduce_meta_grads is not None:
            reduce_meta_grads([p.grad for p in theta])
        opt.step()
        share.reuse(self, meta_loss.detach(), [g.detach() for g in g_meta])
        return meta_loss.detach()


def meta_step(
    model: nn.Module,
    meta_net: nn.Module,
    meta_opt: torch.optim.Optimizer | None,
    batch: StepBatch,
    meta_batch: StepBatch | None,
    *,
    alpha: float,
    meta_params: Sequence[str],
    normalize_weights: bool,
    fns: ClassifierFns,
    update_meta: bool = True,
    mode: str = "jvp",
    real_forward: RealForward | None = None,
    reduce_meta_grads: Callable[[list[torch.Tensor]], None] | None = None,
    meta_grad_scale: float = 1.0,
    meta_dropout: bool = False,
    clean_batch: StepBatch | None = None,
    clean_share: float = 0.0,
    clean_share_at: str = "w",
) -> MetaStepOutput:
    """One iteration of Algorithm 1: virtual step (eqs. 4/8), θ update (eq. 5), weighted loss for eqs. 6/9.

    ``meta_params`` are parameter names (see :func:`resolve_meta_params`). With ``update_meta=False``
    (between ``--meta-interval`` steps) only the weighted loss is computed. The caller backpropagates
    ``output.loss`` and steps its own optimiser; the classifier's ``.grad`` is never touched here.

    ``real_forward(inputs)`` runs the training forward whose graph ``output.loss`` carries (default
    ``fns.forward(model, inputs)``); under torchrun it is the DistributedDataParallel-wrapped forward, so the
    caller's backward all-reduces the classifier's gradients, while ŵ and the meta loss use ``model`` itself.
    ``reduce_meta_grads(grads)`` may change the θ gradients in place before the meta optimiser steps (e.g.
    average them across ranks; each rank's virtual step ran on its own shard).
    ``meta_grad_scale`` multiplies the θ gradients before that (``train`` passes 1/α: the raw gradient is O(α)).
    The meta loss (eq. 5) is taken with the classifier in eval mode: no dropout noise in the estimate of ŵ's clean
    loss, and a cheaper meta forward (no dropout masks to draw). ``meta_dropout=True`` keeps the classifier's own
    mode there, as MW-Net's reference code does.

    ``clean_share`` S > 0 with ``clean_batch`` (``--meta-share``, our extension): the clean rows join the real
    forward after the training rows (:func:`forward_with_clean`) and ``output.loss`` becomes
    ``Σ_i c_i L_i + S · mean CE(clean rows)``. The meta-net, the virtual step and ``output.losses``/``weights``
    see the training rows only. S = 0 is the paper's form, computed exactly as without a clean batch.
    ``clean_share_at="w-hat"`` (``--meta-share-at``): on a step that updates θ the clean term's gradient is the
    meta loss's gradient at ŵ (eq. 5, computed for θ anyway; ``clean_batch`` must be ``meta_batch``) instead of a
    second pass of the clean rows at w (:func:`add_clean_share_gradient`); the other steps run the pass at w.
    """
    share = _CleanShare(clean_batch, clean_share, clean_share_at, meta_batch, update_meta and meta_opt is not None)
    rp = _RealPass(model, fns, batch, meta_params, mode, real_forward, share.real_batch)
    losses = per_sample_loss(rp.logits, batch.labels)
    feats, loss_in = rp.features.detach(), losses.detach()

    meta_loss: torch.Tensor | None = None
    if update_meta and meta_batch is not None and meta_opt is not None:
        theta = [p for p in meta_net.parameters() if p.requires_grad]
        coeffs = weight_coefficients(meta_net(feats, batch.labels, batch.curves, loss_in), normalize_weights)

        def along(g_meta: list[torch.Tensor]) -> Sequence[torch.Tensor | None]:
            # −α Σ_i s_i ∂c_i/∂θ with s_i = ∇L_i(w) · g_meta
            s = rp.forward_tangent(g_meta, lambda logits: per_sample_loss(logits, batch.labels))
            s = torch.zeros_like(batch.labels, dtype=torch.float32) if s is None else s
            return torch.autograd.grad(coeffs, theta, grad_outputs=-alpha * s.to(coeffs.dtype), allow_unused=True)

        meta_loss = rp.meta_update(
            meta_opt,
            theta,
            meta_batch,
            losses,
            coeffs,
            along,
            alpha,
            meta_dropout,
            meta_grad_scale,
            reduce_meta_grads,
            share,
        )

    with torch.no_grad():
        weights = meta_net(feats, batch.labels, batch.curves, loss_in).detach()
    loss = (weight_coefficients(weights, normalize_weights).to(losses.dtype) * losses).sum()
    loss = share.add(loss, rp)
    return MetaStepOutput(loss=loss, losses=loss_in, weights=weights, meta_loss=meta_loss)


# ---------------------------------------------------------------------------------------------
# MLC: meta label correction


@dataclass
class MlcStepOutput:
    """What one MLC step produced: the soft-label loss (with graph), per-sample soft-label losses, the soft labels
    ŷ(θ_new) the loss was taken against, and the meta loss (all detached but ``loss``)."""

    loss: torch.Tensor
    losses: torch.Tensor
    soft_labels: torch.Tensor
    meta_loss: torch.Tensor | None  #: detached 0-d tensor, as in :class:`MetaStepOutput`


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``−Σ_c ŷ_c log softmax(z)_c`` per sample, at least in float32 (MLC's soft loss)."""
    z = _upcast(logits)
    return -(targets.to(z.dtype) * F.log_softmax(z, dim=-1)).sum(-1)


def mlc_step(
    model: nn.Module,
    lcn: nn.Module,
    lcn_opt: torch.optim.Optimizer | None,
    batch: StepBatch,
    meta_batch: StepBatch | None,
    *,
    alpha: float,
    meta_params: Sequence[str],
    fns: ClassifierFns,
    update_meta: bool = True,
    mode: str = "jvp",
    real_forward: RealForward | None = None,
    reduce_meta_grads: Callable[[list[torch.Tensor]], None] | None = None,
    meta_grad_scale: float = 1.0,
    meta_dropout: bool = False,
    clean_batch: StepBatch | None = None,
    clean_share: float = 0.0,
    clean_share_at: str = "w",
) -> MlcStepOutput:
    """One step of Meta Label Correction (Zheng, Awadallah & Dumais, AAAI 2021) with one look-ahead step.

    The label-correction network θ (:class:`~mlrnet_cli.metanet.LabelCorrectionNet`) gives every training row a
    soft label ``ŷ_i(θ)`` from its detached head-input feature and observed label. The virtual step is
    ``ŵ = w − α ∇_w L_train(w, θ)`` with ``L_train = (1/n) Σ_i CE_soft(f(x_i; w), ŷ_i(θ))``; the meta loss is the
    clean meta batch's cross-entropy at ŵ, and the LCN's optimiser steps on its exact gradient dL_meta/dθ. The
    returned loss is the soft-label cross-entropy against ``ŷ(θ_new)`` (detached), for the caller's optimiser.

    w does not depend on θ, so ``dL_meta/dθ = −α ∂/∂θ [g_meta · ∇_w L_train(w, θ)]`` with ``g_meta = ∇L_meta(ŵ)``.
    Through the logits z: ``g_meta · ∇_w L_train = Σ_ic (∂L_train/∂z_ic)(z, θ) dz_ic`` with ``dz`` the logits'
    derivative along g_meta (one forward-mode pass, the training forward replayed), z and dz held fixed.
    ``unrolled`` backpropagates through ŵ(θ) built with ``create_graph=True`` instead.

    The arguments mean what they mean for :func:`meta_step` (modes, head-only path, dropout replay, gradient
    scale and reduction, ``clean_batch``/``clean_share``/``clean_share_at`` for ``--meta-share``); only the
    per-sample weights become soft labels.
    """
    share = _CleanShare(clean_batch, clean_share, clean_share_at, meta_batch, update_meta and lcn_opt is not None)
    rp = _RealPass(model, fns, batch, meta_params, mode, real_forward, share.real_batch)
    feats = rp.features.detach()

    meta_loss: torch.Tensor | None = None
    if update_meta and meta_batch is not None and lcn_opt is not None:
        theta = [p for p in lcn.parameters() if p.requires_grad]
        soft = lcn(feats, batch.labels)

        def along(g_meta: list[torch.Tensor]) -> Sequence[torch.Tensor | None]:
            dz = rp.forward_tangent(g_meta, lambda logits: logits)
            if dz is None:  # the selected parameters do not reach the logits
                return [None for _ in theta]
            z = _upcast(rp.logits.detach()).requires_grad_(True)
            (dl_dz,) = torch.autograd.grad(soft_cross_entropy(z, soft).mean(), z, create_graph=True)
            return torch.autograd.grad(dl_dz, theta, grad_outputs=-alpha * dz.to(dl_dz.dtype), allow_unused=True)

        train_loss = soft_cross_entropy(rp.logits, soft if rp.unrolled else soft.detach()).mean()
        meta_loss = rp.meta_update(
            lcn_opt,
            theta,
            meta_batch,
            train_loss,
            None,
            along,
            alpha,
            meta_dropout,
            meta_grad_scale,
            reduce_meta_grads,
            share,
        )

    with torch.no_grad():
        soft_new = lcn(feats, batch.labels).detach()
    losses = soft_cross_entropy(rp.logits, soft_new)
    loss = share.add(losses.mean(), rp)
    return MlcStepOutput(loss=loss, losses=losses.detach(), soft_labels=soft_new, meta_loss=meta_loss)
