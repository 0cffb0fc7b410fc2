"""The meta-nets: MW-Net's and MLRNet's turn a training sample into a weight in [0, 1] (paper §3.4, §4.3); MLC's
label-correction network turns it into a soft label over the C classes (Zheng et al. 2021).

All share one call signature, ``forward(features, labels, curves, losses)``, returning weights ``[B]`` (MW-Net,
MLRNet) or soft labels ``[B, C]`` (MLC), so the bi-level steps in :mod:`mlrnet_cli.meta` are generic. Every
input is expected to be detached already (stop-gradient): a meta-net never sends gradient back into the
classifier.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
from torch import nn

from mlrnet_cli.errors import ArtifactError

OptTensor = torch.Tensor | None  #: an input a meta-net does not read (MW-Net reads only the losses)


def normalized_curves(losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """I_i (paper §3.3): each epoch's loss minus the mean loss of the sample's observed class at that epoch."""
    if losses.dim() != 2 or labels.dim() != 1 or losses.shape[0] != labels.shape[0]:
        raise ValueError(f"losses [N, T+1] and labels [N] expected, got {tuple(losses.shape)}, {tuple(labels.shape)}")
    labels = labels.long()
    c = int(labels.max().item()) + 1 if labels.numel() else 0
    sums = torch.zeros((c, losses.shape[1]), dtype=losses.dtype, device=losses.device).index_add_(0, labels, losses)
    counts = torch.bincount(labels, minlength=c).to(losses.dtype).clamp_min(1)
    return losses - (sums / counts[:, None])[labels]


def mean_trained_curve(curves: torch.Tensor) -> torch.Tensor:
    """The mean of I_i over the trained epochs 1..T (epoch 0 is the untrained classifier), what ``--curve-prior``
    scales."""
    return (curves[:, 1:] if curves.shape[1] > 1 else curves).mean(-1)


def curve_prior_spread(curves: torch.Tensor, beta: float) -> float:
    """The std of the weights ``--curve-prior`` β gives on its own (the net's logit 0): the spread the weights have
    before the meta-net learned anything."""
    return float(torch.sigmoid(-beta * mean_trained_curve(curves).double()).std()) if beta and len(curves) > 1 else 0.0


class _MetaNet(nn.Module):
    """A meta-net that ``build_meta_net`` rebuilds from its ``spec()``: its ``kind`` and constructor arguments."""

    kind: str
    spec_keys: tuple[str, ...]
    #: extensions the spec holds only when set, so a net without them has the spec it had before they existed
    optional_keys: tuple[str, ...] = ()

    def spec(self) -> dict[str, Any]:
        optional = {k: getattr(self, k) for k in self.optional_keys if getattr(self, k)}
        return {"kind": self.kind, **{k: getattr(self, k) for k in self.spec_keys}, **optional}


class MWNet(_MetaNet):
    """Meta-Weight-Net (Shu et al. 2019): weight = sigmoid(MLP(loss)), an MLP 1 → hidden → 1 with ReLU."""

    kind, spec_keys = "mwnet", ("hidden",)

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.hidden = hidden
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, features: OptTensor, labels: OptTensor, curves: OptTensor, losses: torch.Tensor) -> torch.Tensor:
        """V(L_i; θ) of eqs. 2/4: the weight depends on the per-sample loss only."""
        return torch.sigmoid(self.net(losses.reshape(-1, 1).to(self.net[0].weight.dtype))).squeeze(-1)


def _tanh_mlp(sizes: list[int]) -> nn.Sequential:
    return nn.Sequential(*(m for a, b in pairwise(sizes) for m in (nn.Linear(a, b), nn.Tanh())))


class MLRNetMetaNet(_MetaNet):
    """MLRNet's meta-net (§4.3): V(DF_i; θ) with DF_i built from feature, label embedding and loss curve (eq. 7).

    - ``[h(x_i) ; Y_emb(y_i)]`` → two Tanh layers → ``df_dim``;
    - the normalised loss curve ``I_i`` (length ``curve_len`` = T+1) → three Tanh layers → ``df_dim``;
    - their sum is ``DF_i``; a three-layer Tanh feed-forward net and a final linear unit with a sigmoid give
      the weight in [0, 1].

    ``curve_prior`` β > 0 (our extension) subtracts β × the mean of I_i over epochs 1..T from the logit before
    the sigmoid, with β learned by the meta step like the rest of θ. A fresh meta-net then ranks the rows of
    each label by their stage-1 loss, and a per-label shift the net learns for class balance cannot wash that
    ranking out. 0 is the paper's net.

    ``without_features`` (an ablation, ``--df-inputs label-curve``) leaves ``h(x_i)`` out of the first branch:
    DF_i = Dense(Y_emb(y_i)) + Dense(I_i).

    ``feature_agreement`` (our variant, ``--df-inputs agreement``) lets ``h(x_i)`` into the first branch only as its
    agreement with the observed label, the scalar a_i = <U h(x_i), Y_emb(y_i)> / sqrt(label_emb_dim) with U learned:
    DF_i = Dense(concat(a_i, Y_emb(y_i))) + Dense(I_i). Within a label the feature can then only rank rows along
    that label's own direction Uᵀ Y_emb(y_i), not along one direction shared by every label.
    """

    kind, spec_keys = "mlrnet", ("feature_dim", "num_classes", "curve_len", "label_emb_dim", "df_dim")
    optional_keys = ("curve_prior", "without_features", "feature_agreement")

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        curve_len: int,
        label_emb_dim: int = 128,
        df_dim: int = 128,
        curve_prior: float = 0.0,
        without_features: bool = False,
        feature_agreement: bool = False,
    ) -> None:
        super().__init__()
        if without_features and feature_agreement:
            raise ValueError("without_features and feature_agreement exclude each other")
        self.feature_dim, self.num_classes, self.curve_len = feature_dim, num_classes, curve_len
        self.label_emb_dim, self.df_dim, self.curve_prior = label_emb_dim, df_dim, float(curve_prior)
        self.without_features, self.feature_agreement = bool(without_features), bool(feature_agreement)
        if self.curve_prior:
            self.prior_scale = nn.Parameter(torch.tensor(self.curve_prior))
        self.label_embedding = nn.Embedding(num_classes, label_emb_dim)
        if self.feature_agreement:
            self.agreement = nn.Linear(feature_dim, label_emb_dim, bias=False)
        first = 0 if self.without_features else 1 if self.feature_agreement else feature_dim
        self.feature_branch = _tanh_mlp([first + label_emb_dim, df_dim, df_dim])
        self.curve_branch = _tanh_mlp([curve_len, df_dim, df_dim, df_dim])
        self.feed_forward = _tanh_mlp([df_dim, df_dim, df_dim, df_dim])
        self.out = nn.Linear(df_dim, 1)

    def branches(
        self, features: OptTensor, labels: torch.Tensor, curves: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two summands of DF_i (eq. 7): Dense(concat(h(x_i), Y_emb(y_i))) (Dense(Y_emb(y_i)) without the
        feature, Dense(concat(a_i, Y_emb(y_i))) with its agreement) and Dense(I_i)."""
        dtype = self.out.weight.dtype
        label_emb = self.label_embedding(labels)
        if self.without_features:
            joint = label_emb
        elif self.feature_agreement:
            joint = torch.cat([self.label_agreement(features, label_emb).unsqueeze(-1), label_emb], dim=-1)
        else:
            joint = torch.cat([features.to(dtype), label_emb], dim=-1)
        return self.feature_branch(joint), self.curve_branch(curves.to(dtype))

    def label_agreement(self, features: torch.Tensor, label_emb: torch.Tensor) -> torch.Tensor:
        """a_i = <U h(x_i), Y_emb(y_i)> / sqrt(label_emb_dim): how far the row's feature reads like its label."""
        projected = self.agreement(features.to(self.out.weight.dtype))
        return (projected * label_emb).sum(-1) / self.label_emb_dim**0.5

    def discriminative_features(self, features: OptTensor, labels: torch.Tensor, curves: torch.Tensor) -> torch.Tensor:
        """DF(H(x), Y_emb, I_i) = Dense(concat(h(x_i), Y_emb(y_i))) + Dense(I_i) (eq. 7)."""
        feature_part, curve_part = self.branches(features, labels, curves)
        return feature_part + curve_part

    def net_logit(self, df: torch.Tensor) -> torch.Tensor:
        """The logit V(DF_i; θ) puts through its sigmoid (eqs. 8/9), before the curve prior."""
        return self.out(self.feed_forward(df)).squeeze(-1)

    def prior_term(self, curves: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """β × the mean of I_i over epochs 1..T, what ``--curve-prior`` subtracts from the logit (None when off)."""
        return self.prior_scale * mean_trained_curve(curves).to(dtype) if self.curve_prior else None

    def forward(
        self, features: OptTensor, labels: torch.Tensor, curves: torch.Tensor, losses: OptTensor = None
    ) -> torch.Tensor:
        """V(DF_i; θ) of eqs. 8/9: a weight in [0, 1] per sample."""
        logit = self.net_logit(self.discriminative_features(features, labels, curves))
        prior = self.prior_term(curves, logit.dtype)
        return torch.sigmoid(logit if prior is None else logit - prior)


class LabelCorrectionNet(_MetaNet):
    """MLC's label-correction network (LCN; Zheng, Awadallah & Dumais, AAAI 2021): a soft label
    ``ŷ_i = softmax(g([h(x_i) ; Y_emb(ỹ_i)]; θ))`` over the C classes, from the classifier's head-input feature
    and the observed label.

    As in microsoft/MLC's ``MetaNet``: the label embedding, two Tanh layers of ``hidden_dim`` and a linear
    layer to the C class logits, Xavier-initialised weights and zero biases (so a fresh LCN does not simply
    copy the observed label). The reference sizes are a 64-d label embedding and 128 hidden units.
    """

    kind, spec_keys = "mlc", ("feature_dim", "num_classes", "label_emb_dim", "hidden_dim")

    def __init__(self, feature_dim: int, num_classes: int, label_emb_dim: int = 64, hidden_dim: int = 128) -> None:
        super().__init__()
        self.feature_dim, self.num_classes = feature_dim, num_classes
        self.label_emb_dim, self.hidden_dim = label_emb_dim, hidden_dim
        self.label_embedding = nn.Embedding(num_classes, label_emb_dim)
        self.hidden = _tanh_mlp([feature_dim + label_emb_dim, hidden_dim, hidden_dim])
        self.out = nn.Linear(hidden_dim, num_classes)
        nn.init.xavier_uniform_(self.label_embedding.weight)
        for layer in [*self.hidden, self.out]:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_normal_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor, curves: OptTensor = None, losses: OptTensor = None
    ) -> torch.Tensor:
        """ŷ_i(θ): a soft label (a probability vector over the C classes) per sample, ``[B, C]``."""
        joint = torch.cat([features.to(self.out.weight.dtype), self.label_embedding(labels)], dim=-1)
        return torch.softmax(self.out(self.hidden(joint)), dim=-1)


def build_meta_net(spec: dict[str, Any]) -> MWNet | MLRNetMetaNet | LabelCorrectionNet:
    """Rebuild a meta-net from the ``spec()`` saved beside its weights."""
    kind = spec.get("kind")
    for cls in (MWNet, LabelCorrectionNet, MLRNetMetaNet):
        if kind == cls.kind:
            try:
                return cls(**{k: spec[k] for k in (*cls.spec_keys, *cls.optional_keys) if k in spec})
            except (TypeError, ValueError) as e:  # a size missing (no default) or not a size
                raise ArtifactError(f"the saved {kind} meta-net spec is incomplete or invalid: {e}") from e
    raise ArtifactError(f"unknown meta-net kind {kind!r} in a saved meta-net")
