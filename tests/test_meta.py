"""The meta-nets and the bi-level meta step: exact θ gradients (finite differences in fp64), shapes, ranges."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mlrnet_cli.errors import ArtifactError, ConfigError
from mlrnet_cli.meta import (
    ClassifierFns,
    StepBatch,
    meta_step,
    mlc_step,
    parse_meta_params,
    resolve_meta_params,
    soft_cross_entropy,
    weight_coefficients,
)
from mlrnet_cli.metanet import LabelCorrectionNet, MLRNetMetaNet, MWNet, build_meta_net

C, T1 = 3, 4


def _bert(dropout: float = 0.0, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=C,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        classifier_dropout=dropout,
    )
    model = BertForSequenceClassification(cfg).double()
    model.train(dropout > 0)
    return model


def _forward(m, inputs):
    out = m.bert(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    feats = m.dropout(out.pooler_output)
    return feats, m.classifier(feats)


def _head(m, feats):
    return m.classifier(feats)


FNS = ClassifierFns(forward=_forward, head=_head, head_prefix="classifier.")
FROZEN = ClassifierFns(
    forward=lambda m, inp: (inp["features"], _head(m, inp["features"])), head=_head, head_prefix="classifier."
)


def _batch(n: int, seed: int, curves: bool = True) -> StepBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (n, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    labels = torch.randint(0, C, (n,), generator=g)
    cur = torch.randn(n, T1, generator=g, dtype=torch.float64) if curves else None
    return StepBatch({"input_ids": ids, "attention_mask": mask}, labels, cur)


def _meta_net(kind: str, seed: int = 1):
    torch.manual_seed(seed)
    if kind.startswith("mlrnet"):  # "-prior": the curve prior (--curve-prior 1); "-nofeat": DF without h; "-agree": h
        # only through its agreement with the label (--df-inputs agreement)
        flags = {"without_features": kind == "mlrnet-nofeat", "feature_agreement": kind == "mlrnet-agree"}
        net = MLRNetMetaNet(16, C, T1, label_emb_dim=8, df_dim=8, curve_prior=float(kind == "mlrnet-prior"), **flags)
    else:
        net = MWNet(hidden=10)
    return net.double()


def _theta_grad(model, net, batch, meta, *, alpha, names, normalize, fns=FNS, mode="jvp", meta_dropout=False):
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    out = meta_step(
        model,
        net,
        opt,
        batch,
        meta,
        alpha=alpha,
        meta_params=names,
        normalize_weights=normalize,
        fns=fns,
        mode=mode,
        meta_dropout=meta_dropout,
    )
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()]), out


def _meta_loss_reference(model, net, batch, meta, *, alpha, names, normalize, seed=None, meta_eval=False):
    """L_meta(ŵ(θ)) computed the plain way: real parameter copies, no functional_call."""
    if seed is not None:  # the training forward's dropout masks, as meta_step draws them after the same seed
        torch.manual_seed(seed)
    feats, logits = _forward(model, batch.inputs)
    losses = F.cross_entropy(logits, batch.labels, reduction="none")
    v = net(feats.detach(), batch.labels, batch.curves, losses.detach()).detach()
    c = weight_coefficients(v, normalize)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad((c * losses).sum(), [params[n] for n in names])
    stepped = copy.deepcopy(model)
    sp = dict(stepped.named_parameters())
    with torch.no_grad():
        for n, g in zip(names, grads, strict=True):
            sp[n].sub_(alpha * g)
    stepped.train(not meta_eval and model.training)
    _, mlogits = _forward(stepped, meta.inputs)
    return F.cross_entropy(mlogits, meta.labels).item()


def _fd_along(model, net, batch, meta, d, eps=1e-5, **reference):
    """Central finite difference of L_meta(ŵ(θ)) along the θ direction ``d`` (see _meta_loss_reference)."""
    vals = []
    for sign in (1, -1):
        net2 = copy.deepcopy(net)
        with torch.no_grad():
            for p, dp in zip(net2.parameters(), d, strict=True):
                p.add_(sign * eps * dp)
        vals.append(_meta_loss_reference(model, net2, batch, meta, **reference))
    return (vals[0] - vals[1]) / (2 * eps)


@pytest.mark.parametrize(
    ("kind", "spec", "normalize", "mode"),
    [
        ("mlrnet", "all", False, "jvp"),
        ("mlrnet", "all", True, "jvp"),
        ("mlrnet-prior", "all", True, "jvp"),
        ("mlrnet-prior", "head", False, "unrolled"),
        ("mlrnet-nofeat", "all", True, "jvp"),
        ("mlrnet-agree", "all", True, "jvp"),
        ("mlrnet-agree", "head", False, "unrolled"),
        ("mlrnet", "last-1", False, "jvp"),
        ("mlrnet", "head", True, "jvp"),
        ("mwnet", "all", False, "jvp"),
        ("mlrnet", "all", False, "unrolled"),
        ("mwnet", "head", True, "unrolled"),
    ],
)
def test_theta_gradient_matches_central_finite_differences(kind, spec, normalize, mode):
    model = _bert()
    net = _meta_net(kind)
    batch, meta = _batch(6, 1), _batch(5, 2, curves=False)
    alpha = 3.0
    names = resolve_meta_params(model, spec, "classifier.")
    grad, _ = _theta_grad(model, net, batch, meta, alpha=alpha, names=names, normalize=normalize, mode=mode)
    assert grad.abs().max() > 1e-6  # a live meta-net, not a vacuous comparison
    theta = list(net.parameters())
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        d = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in theta]
        fd = _fd_along(model, net, batch, meta, d, alpha=alpha, names=names, normalize=normalize)
        analytic = float(grad @ torch.cat([x.reshape(-1) for x in d]))
        assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("meta_dropout", [False, True])
def test_jvp_and_unrolled_agree_with_dropout_on(meta_dropout):
    """The forward-mode pass replays the training forward's dropout masks, so both modes give one gradient."""
    batch, meta = _batch(6, 3), _batch(5, 4, curves=False)
    grads = []
    for mode in ("jvp", "unrolled"):
        model, net = _bert(dropout=0.2), _meta_net("mlrnet")
        names = resolve_meta_params(model, "all", "classifier.")
        torch.manual_seed(123)
        g, _ = _theta_grad(
            model, net, batch, meta, alpha=2.0, names=names, normalize=False, mode=mode, meta_dropout=meta_dropout
        )
        grads.append(g)
    assert torch.allclose(grads[0], grads[1], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(("spec", "mode"), [("all", "jvp"), ("all", "unrolled"), ("head", "jvp")])
def test_the_meta_loss_is_taken_in_eval_mode_by_default(spec, mode):
    """With dropout on, the default θ gradient is that of the meta loss of the eval-mode ŵ (eq. 5)."""
    batch, meta = _batch(6, 5), _batch(5, 6, curves=False)
    model, net = _bert(dropout=0.3), _meta_net("mlrnet")
    model.bert.embeddings.eval()  # a submodule's own mode must survive the meta step
    names = resolve_meta_params(model, spec, "classifier.")
    alpha, seed = 3.0, 123
    torch.manual_seed(seed)
    grad, _ = _theta_grad(model, net, batch, meta, alpha=alpha, names=names, normalize=True, mode=mode)
    assert model.training and model.bert.encoder.training and not model.bert.embeddings.training
    torch.manual_seed(seed)
    with_dropout, _ = _theta_grad(
        model, copy.deepcopy(net), batch, meta, alpha=alpha, names=names, normalize=True, mode=mode, meta_dropout=True
    )
    assert not torch.allclose(grad, with_dropout)  # the meta forward's dropout does change the gradient
    theta = list(net.parameters())
    d = [torch.randn(p.shape, generator=torch.Generator().manual_seed(8), dtype=p.dtype) for p in theta]
    fd = _fd_along(model, net, batch, meta, d, alpha=alpha, names=names, normalize=True, seed=seed, meta_eval=True)
    assert float(grad @ torch.cat([x.reshape(-1) for x in d])) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_meta_params_agree_when_only_the_head_trains():
    model = _bert()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("classifier."))
    g = torch.Generator().manual_seed(5)
    batch = StepBatch(
        {"features": torch.randn(6, 16, generator=g, dtype=torch.float64)},
        torch.randint(0, C, (6,), generator=g),
        torch.randn(6, T1, generator=g, dtype=torch.float64),
    )
    meta = StepBatch(
        {"features": torch.randn(4, 16, generator=g, dtype=torch.float64)}, torch.randint(0, C, (4,), generator=g)
    )
    grads = {}
    for spec in ("all", "head", "last-1"):
        names = resolve_meta_params(model, spec, "classifier.")
        assert names == ["classifier.weight", "classifier.bias"]
        grads[spec], _ = _theta_grad(
            model, _meta_net("mlrnet"), batch, meta, alpha=2.0, names=names, normalize=True, fns=FROZEN
        )
    assert grads["all"].abs().max() > 0
    assert torch.equal(grads["all"], grads["head"]) and torch.equal(grads["all"], grads["last-1"])


@pytest.mark.parametrize("mode", ["jvp", "unrolled"])
def test_head_path_takes_lower_precision_features_from_the_real_forward(mode):
    """On CUDA the real forward runs under bf16 autocast, so its features are not in the head's dtype; the
    head-only meta forward at ŵ and the replay of the directional losses run outside it and give the same θ step."""
    model, batch, meta = _bert(), _batch(6, 0), _batch(4, 1)
    names = resolve_meta_params(model, "head", "classifier.")
    exact, _ = _theta_grad(model, _meta_net("mlrnet"), batch, meta, alpha=2.0, names=names, normalize=True, mode=mode)
    net = _meta_net("mlrnet")
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    low = lambda m, inputs: tuple(t.float() for t in _forward(m, inputs))  # noqa: E731
    fns = ClassifierFns(forward=low, head=_head, head_prefix="classifier.")
    real = lambda inputs: low(model, inputs)  # noqa: E731
    meta_step(
        model,
        net,
        opt,
        batch,
        meta,
        alpha=2.0,
        meta_params=names,
        normalize_weights=True,
        fns=fns,
        real_forward=real,
        mode=mode,
    )
    lowered = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    assert exact.abs().max() > 0
    torch.testing.assert_close(lowered, exact, rtol=1e-3, atol=1e-6)


def test_meta_step_leaves_classifier_grads_alone_and_returns_the_weighted_loss():
    model, net = _bert(), _meta_net("mlrnet")
    batch, meta = _batch(6, 1), _batch(5, 2, curves=False)
    names = resolve_meta_params(model, "all", "classifier.")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in net.parameters()]
    out = meta_step(model, net, opt, batch, meta, alpha=1.0, meta_params=names, normalize_weights=False, fns=FNS)
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))  # θ moved
    with torch.no_grad():
        feats, logits = _forward(model, batch.inputs)
        losses = F.cross_entropy(logits, batch.labels, reduction="none")
        v = net(feats, batch.labels, batch.curves, losses)  # the *updated* θ (eq. 9)
    assert torch.allclose(out.weights, v)
    assert out.loss.item() == pytest.approx((v * losses).mean().item(), rel=1e-12)
    assert out.losses.shape == (6,) and out.meta_loss is not None
    out.loss.backward()
    assert model.classifier.weight.grad is not None


def _share_step(
    model, net, batch, meta, *, share, mode="jvp", spec="all", real_forward=None, lr=1e-2, at="w", clean=None
):
    """One meta_step with --meta-share ``share`` (θ moved by Adam, so c_i come from the updated meta-net)."""
    names = resolve_meta_params(model, spec, "classifier.")
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    clean = meta if clean is None else clean
    kwargs = {} if share is None else {"clean_batch": clean, "clean_share": share, "clean_share_at": at}
    return meta_step(
        model,
        net,
        opt,
        batch,
        meta,
        alpha=2.0,
        meta_params=names,
        normalize_weights=True,
        fns=FNS,
        mode=mode,
        real_forward=real_forward,
        **kwargs,
    )


@pytest.mark.parametrize(("mode", "spec"), [("jvp", "all"), ("unrolled", "all"), ("jvp", "head")])
def test_meta_share_adds_the_meta_batch_to_the_real_step_gradient(mode, spec):
    """--meta-share S: the real step's classifier gradient is that of Σ_i c_i L_i + S · mean CE(meta batch),
    c_i from the meta-net after its update (eq. 9 plus our extension)."""
    model, net = _bert(), _meta_net("mlrnet")
    batch, meta = _batch(6, 1), _batch(5, 2, curves=False)
    theta0 = [p.detach().clone() for p in net.parameters()]
    out = _share_step(model, net, batch, meta, share=0.5, mode=mode, spec=spec)
    assert any(not torch.equal(a, b) for a, b in zip(theta0, net.parameters(), strict=True))  # θ moved first
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss, params)
    feats, logits = _forward(model, batch.inputs)
    losses = F.cross_entropy(logits, batch.labels, reduction="none")
    with torch.no_grad():
        c = weight_coefficients(net(feats, batch.labels, batch.curves, losses), True)
    weighted = (c * losses).sum()
    clean = F.cross_entropy(_forward(model, meta.inputs)[1], meta.labels)
    want = torch.autograd.grad(weighted + 0.5 * clean, params, retain_graph=True)
    paper = torch.autograd.grad(weighted, params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert max(float((w - p).abs().max()) for w, p in zip(want, paper, strict=True)) > 1e-3  # the clean part counts
    assert out.loss.item() == pytest.approx((weighted + 0.5 * clean).item(), rel=1e-12)


def test_meta_share_zero_is_the_papers_loss_and_forward():
    """S = 0 computes exactly what a step without a clean batch does; the meta rows never enter the real forward."""
    batch, meta = _batch(6, 1), _batch(5, 2, curves=False)
    outs, calls = [], []
    for share in (None, 0.0):
        model, net = _bert(dropout=0.2), _meta_net("mlrnet")

        def real(inputs, model=model):
            calls.append(type(inputs))
            return _forward(model, inputs)

        torch.manual_seed(5)
        outs.append(_share_step(model, net, batch, meta, share=share, real_forward=real))
    assert torch.equal(outs[0].loss, outs[1].loss) and torch.equal(outs[0].weights, outs[1].weights)
    assert calls == [dict, dict]


@pytest.mark.parametrize("mode", ["jvp", "unrolled"])
def test_meta_share_leaves_the_meta_net_and_its_inputs_alone(mode):
    """With dropout on, S > 0 changes neither the θ step (the training rows run first in the shared forward, with
    the dropout masks the jvp replay draws) nor the weights and losses, which cover the training rows only."""
    batch, meta = _batch(6, 3), _batch(5, 4, curves=False)
    runs = []
    for share in (0.0, 0.5):
        model, net = _bert(dropout=0.2), _meta_net("mlrnet")
        torch.manual_seed(11)
        out = _share_step(model, net, batch, meta, share=share, mode=mode)
        runs.append((out, torch.cat([p.detach().reshape(-1) for p in net.parameters()])))
    (a, theta_a), (b, theta_b) = runs
    assert b.weights.shape == b.losses.shape == (6,)
    torch.testing.assert_close(theta_a, theta_b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.losses, b.losses, rtol=0, atol=0)
    torch.testing.assert_close(a.weights, b.weights, rtol=1e-12, atol=1e-14)
    assert b.loss.item() > a.loss.item()  # the clean part was added


def _virtual_step_grad(model, batch, meta, train_loss, alpha):
    """By hand: ŵ = w − α ∇_w train_loss(logits) over every parameter, and ∇ mean CE(meta batch) at ŵ (eqs. 4/5)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    _, logits = _forward(model, batch.inputs)
    grads = torch.autograd.grad(train_loss(logits), params, allow_unused=True, materialize_grads=True)
    w_hat = {n: (p - alpha * g).detach().requires_grad_(True) for n, p, g in zip(names, params, grads, strict=True)}
    meta_logits = torch.func.functional_call(model, w_hat, (), meta.inputs).logits
    meta_loss = F.cross_entropy(meta_logits, meta.labels)
    return meta_loss, torch.autograd.grad(meta_loss, list(w_hat.values()), materialize_grads=True)


@pytest.mark.parametrize("mode", ["jvp", "unrolled"])
def test_meta_share_at_w_hat_adds_the_meta_losss_gradient_at_w_hat(mode):
    """--meta-share-at w-hat: the real step's classifier gradient is that of Σ_i c_i(θ_new) L_i plus S × the meta
    loss's gradient at ŵ (ŵ from θ before its update), with no pass of the meta rows at w; the logged loss adds
    S × the meta loss at ŵ."""
    model, net = _bert(), _meta_net("mlrnet")
    batch, meta = _batch(6, 1), _batch(5, 2, curves=False)
    feats, logits = _forward(model, batch.inputs)
    losses = F.cross_entropy(logits, batch.labels, reduction="none")
    with torch.no_grad():
        c_old = weight_coefficients(net(feats, batch.labels, batch.curves, losses), True)
    weighted_ce = lambda z: (c_old * F.cross_entropy(z, batch.labels, reduction="none")).sum()  # noqa: E731
    meta_loss, g_hat = _virtual_step_grad(model, batch, meta, weighted_ce, alpha=2.0)

    calls = []

    def real(inputs):
        calls.append(type(inputs))
        return _forward(model, inputs)

    names = resolve_meta_params(model, "all", "classifier.")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    kwargs = {"clean_batch": meta, "clean_share": 0.5, "clean_share_at": "w-hat"}
    out = meta_step(
        model, net, opt, batch, meta, alpha=2.0, meta_params=names, normalize_weights=True, fns=FNS, mode=mode,
        real_forward=real, **kwargs,
    )  # fmt: skip
    assert calls == [dict]  # the training rows alone: no second pass of the meta rows
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss, params)
    with torch.no_grad():
        c_new = weight_coefficients(net(feats, batch.labels, batch.curves, losses), True)
    weighted = torch.autograd.grad((c_new * losses).sum(), params, retain_graph=True)
    at_w = torch.autograd.grad(F.cross_entropy(_forward(model, meta.inputs)[1], meta.labels), params)
    for g, w, h in zip(got, weighted, g_hat, strict=True):
        torch.testing.assert_close(g, w + 0.5 * h, rtol=1e-9, atol=1e-12)
    # ŵ is a real step away from w: the gradient there is not the one at w (so the test tells the two apart)
    assert max(float((h - a).abs().max()) for h, a in zip(g_hat, at_w, strict=True)) > 1e-4
    assert out.loss.item() == pytest.approx((c_new * losses).sum().item() + 0.5 * meta_loss.item(), rel=1e-10)


def test_meta_share_at_w_hat_runs_the_pass_at_w_on_steps_without_a_meta_update():
    """Between --meta-interval steps there is no g_meta: the meta rows join the real forward, as with ``w``."""
    batch, meta = _batch(6, 1), _batch(5, 2, curves=False)
    outs = []
    for at in ("w", "w-hat"):
        model, net = _bert(), _meta_net("mlrnet")
        names = resolve_meta_params(model, "all", "classifier.")
        out = meta_step(
            model, net, None, batch, meta, alpha=2.0, meta_params=names, normalize_weights=True, fns=FNS,
            update_meta=False, clean_batch=meta, clean_share=0.5, clean_share_at=at,
        )  # fmt: skip
        outs.append(torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad]))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_meta_share_at_w_hat_needs_every_parameter_in_w_hat_and_the_meta_batch():
    model, net = _bert(), _meta_net("mlrnet")
    batch, meta = _batch(6, 1), _batch(5, 2, curves=False)
    with pytest.raises(ConfigError, match="--meta-params all"):
        _share_step(model, net, batch, meta, share=0.5, spec="head", at="w-hat")
    with pytest.raises(ConfigError, match="the meta batch"):
        _share_step(model, net, batch, meta, share=0.5, at="w-hat", clean=_batch(5, 3, curves=False))
    with pytest.raises(ConfigError, match="--meta-share-at"):
        _share_step(model, net, batch, meta, share=0.5, at="w_hat")


def _theta_update(alpha: float, scale: float) -> torch.Tensor:
    """θ_after - θ_before for one Adam step with MW-Net's coupled weight decay 1e-4 (what `train` uses)."""
    model, net = _bert(), _meta_net("mlrnet")
    batch, meta = _batch(6, 1), _batch(5, 2, curves=False)
    names = resolve_meta_params(model, "all", "classifier.")
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    before = torch.cat([p.detach().reshape(-1).clone() for p in net.parameters()])
    meta_step(
        model,
        net,
        opt,
        batch,
        meta,
        alpha=alpha,
        meta_params=names,
        normalize_weights=True,
        fns=FNS,
        meta_grad_scale=scale,
    )
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]) - before


def test_meta_grad_scale_makes_the_theta_step_independent_of_a_small_alpha():
    # At a fine-tuning α the raw θ gradient is O(α): below Adam's eps and under the weight decay, so the
    # step mostly shrinks θ (a meta-net that ends up giving every row the same weight).
    theta = torch.cat([p.detach().reshape(-1) for p in _meta_net("mlrnet").parameters()])
    nz = theta.abs() > 1e-2  # where 1e-4·θ is well above Adam's eps
    raw = _theta_update(1e-9, 1.0)
    assert torch.allclose(raw[nz], -1e-3 * theta[nz].sign(), atol=1e-5)  # Adam's first step on the decay alone
    # Divided by α, the step is the same for any small α, and it is not the weight decay's.
    a, b = _theta_update(1e-6, 1e6), _theta_update(1e-8, 1e8)
    assert F.cosine_similarity(a, b, dim=0) > 0.999
    shrinks = (a[nz].sign() == -theta[nz].sign()).double().mean()
    assert 0.2 < shrinks < 0.8


def test_no_meta_update_between_intervals():
    model, net = _bert(), _meta_net("mwnet")
    batch = _batch(4, 1)
    before = [p.detach().clone() for p in net.parameters()]
    out = meta_step(
        model, net, None, batch, None, alpha=1.0, meta_params=[], normalize_weights=True, fns=FNS, update_meta=False
    )
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert out.meta_loss is None
    assert out.loss.item() == pytest.approx((out.weights / out.weights.sum() * out.losses).sum().item())


@pytest.mark.parametrize("kind", ["mlrnet", "mlrnet-prior", "mlrnet-nofeat", "mlrnet-agree", "mwnet"])
def test_weights_are_in_unit_interval_with_one_per_sample(kind):
    net = _meta_net(kind).float()
    g = torch.Generator().manual_seed(0)
    feats = 50 * torch.randn(64, 16, generator=g)
    labels = torch.randint(0, C, (64,), generator=g)
    curves = 50 * torch.randn(64, T1, generator=g)
    losses = 30 * torch.rand(64, generator=g)
    w = net(feats, labels, curves, losses)
    assert w.shape == (64,)
    assert bool(((w >= 0) & (w <= 1)).all())
    if kind != "mwnet":
        assert net.discriminative_features(feats, labels, curves).shape == (64, 8)
    rebuilt = build_meta_net(net.spec())
    assert type(rebuilt) is type(net)
    rebuilt.load_state_dict(net.state_dict())  # the spec rebuilds every parameter, the prior's β included
    assert torch.equal(rebuilt(feats, labels, curves, losses), w)


def test_the_curve_prior_ranks_each_labels_rows_by_their_mean_stage1_loss():
    """--curve-prior: with the learned part silent, the weights within a label fall as the mean of I_i over
    epochs 1..T rises (epoch 0 plays no part), and β is a parameter of θ that the meta step trains."""
    net = MLRNetMetaNet(16, C, T1, label_emb_dim=8, df_dim=8, curve_prior=2.0).double()
    with torch.no_grad():
        net.out.weight.zero_()
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(40) % C
    curves = torch.randn(40, T1, generator=g, dtype=torch.float64)
    w = net(torch.randn(40, 16, generator=g, dtype=torch.float64), labels, curves)
    expected = torch.sigmoid(net.out.bias - 2.0 * curves[:, 1:].mean(-1))
    assert torch.allclose(w, expected)
    curves[:, 0] += 100.0  # the untrained classifier's epoch 0 is left out
    assert torch.allclose(net(torch.zeros(40, 16, dtype=torch.float64), labels, curves), expected)
    assert "prior_scale" in dict(net.named_parameters())
    paper = MLRNetMetaNet(16, C, T1)  # 0: the paper's net, no extra parameter, and the spec it always had
    assert not hasattr(paper, "prior_scale") and "curve_prior" not in paper.spec()
    assert build_meta_net(net.spec()).curve_prior == 2.0 and build_meta_net(paper.spec()).curve_prior == 0.0


def test_df_inputs_label_curve_leaves_the_classifiers_feature_out():
    """--df-inputs label-curve: the first branch reads the label embedding alone (its first layer has no feature
    columns), so the weights do not move with h(x_i) but do with the label and the curve; the spec says so and
    rebuilds it, and the paper's net keeps the spec it always had."""
    net = MLRNetMetaNet(16, C, T1, label_emb_dim=8, df_dim=8, without_features=True).double()
    assert tuple(net.feature_branch[0].weight.shape) == (8, 8)
    g = torch.Generator().manual_seed(5)
    labels, curves = torch.arange(12) % C, torch.randn(12, T1, generator=g, dtype=torch.float64)
    w = net(torch.randn(12, 16, generator=g, dtype=torch.float64), labels, curves)
    assert torch.equal(net(100 * torch.randn(12, 16, generator=g, dtype=torch.float64), labels, curves), w)
    assert not torch.allclose(net(None, labels, curves.flip(0)), w)
    assert not torch.allclose(net(None, (labels + 1) % C, curves), w)
    assert net.spec()["without_features"] is True and "without_features" not in MLRNetMetaNet(16, C, T1).spec()
    rebuilt = build_meta_net(net.spec()).double()
    rebuilt.load_state_dict(net.state_dict())
    assert torch.equal(rebuilt(None, labels, curves), w)


def test_df_inputs_agreement_lets_the_feature_in_only_along_the_labels_own_direction():
    """--df-inputs agreement: within a label the weight moves with h(x_i) only along U^T Y_emb(y_i) (a shift of h
    orthogonal to it leaves every weight as it was, one along it does not), the direction differs from label to
    label, the first branch reads 1 + label_emb_dim columns, and the spec rebuilds the net."""
    net = MLRNetMetaNet(16, C, T1, label_emb_dim=8, df_dim=8, feature_agreement=True).double()
    assert tuple(net.feature_branch[0].weight.shape) == (8, 9) and tuple(net.agreement.weight.shape) == (8, 16)
    g = torch.Generator().manual_seed(9)
    labels, curves = torch.full((6,), 2), torch.randn(6, T1, generator=g, dtype=torch.float64)
    feats = torch.randn(6, 16, generator=g, dtype=torch.float64)
    with torch.no_grad():
        direction = net.agreement.weight.T @ net.label_embedding.weight[2]  # U^T Y_emb(2), [16]
    other = torch.randn(16, generator=g, dtype=torch.float64)
    orthogonal = other - (other @ direction) / (direction @ direction) * direction
    w = net(feats, labels, curves)
    assert torch.allclose(net(feats + 10 * orthogonal, labels, curves), w, atol=1e-12)
    assert not torch.allclose(net(feats + direction, labels, curves), w)
    ones = torch.full((6,), 1)  # another label's own direction is another vector: the same shift moves its weights
    assert not torch.allclose(net(feats + 10 * orthogonal, ones, curves), net(feats, ones, curves))
    expected = (net.agreement(feats) * net.label_embedding(labels)).sum(-1) / 8**0.5
    assert torch.allclose(net.label_agreement(feats, net.label_embedding(labels)), expected)
    assert net.spec()["feature_agreement"] is True and "feature_agreement" not in MLRNetMetaNet(16, C, T1).spec()
    rebuilt = build_meta_net(net.spec()).double()
    rebuilt.load_state_dict(net.state_dict())
    assert torch.equal(rebuilt(feats, labels, curves), w)
    with pytest.raises(ValueError, match="exclude each other"):
        MLRNetMetaNet(16, C, T1, without_features=True, feature_agreement=True)


@pytest.mark.parametrize(
    "spec",
    [{"kind": "mlrnet", "feature_dim": 16, "num_classes": C}, {"kind": "mlc", "feature_dim": "x", "num_classes": C}],
)
def test_an_incomplete_or_invalid_meta_net_spec_is_an_artifact_error(spec):
    with pytest.raises(ArtifactError, match="incomplete or invalid"):
        build_meta_net(spec)


def test_mlrnet_meta_net_structure_follows_section_4_3():
    net = MLRNetMetaNet(feature_dim=768, num_classes=4, curve_len=11)
    assert tuple(net.label_embedding.weight.shape) == (4, 128)
    linears = lambda s: [m for m in s if isinstance(m, torch.nn.Linear)]  # noqa: E731
    assert [tuple(m.weight.shape) for m in linears(net.feature_branch)] == [(128, 896), (128, 128)]
    assert [tuple(m.weight.shape) for m in linears(net.curve_branch)] == [(128, 11), (128, 128), (128, 128)]
    assert len(linears(net.feed_forward)) == 3
    assert sum(isinstance(m, torch.nn.Tanh) for m in net.modules()) == 8


def test_resolve_meta_params():
    model = _bert()
    names = [n for n, _ in model.named_parameters()]
    assert resolve_meta_params(model, "all", "classifier.") == names
    assert resolve_meta_params(model, "head", "classifier.") == ["classifier.weight", "classifier.bias"]
    last1 = resolve_meta_params(model, "last-1", "classifier.")
    assert last1[0].startswith("bert.encoder.layer.1.") and "bert.pooler.dense.weight" in last1
    assert not any(n.startswith("bert.encoder.layer.0.") for n in last1)
    assert resolve_meta_params(model, "last-9", "classifier.")[0] == "bert.encoder.layer.0.attention.self.query.weight"
    for bad in ("last-0", "some", "last-x"):
        with pytest.raises(ConfigError):
            parse_meta_params(bad)


def test_weight_coefficients():
    w = torch.tensor([0.5, 0.25, 0.25, 0.0])
    assert torch.allclose(weight_coefficients(w, False), w / 4)
    assert torch.allclose(weight_coefficients(w, True), w)
    assert torch.equal(weight_coefficients(torch.zeros(3), True), torch.zeros(3))


# ---------------------------------------------------------------------------------------------
# MLC: the label-correction network's θ gradient and the soft-label real step


def _lcn(seed: int = 1) -> LabelCorrectionNet:
    torch.manual_seed(seed)
    return LabelCorrectionNet(16, C, label_emb_dim=8, hidden_dim=8).double()


def _mlc_theta_grad(model, lcn, batch, meta, *, alpha, names, fns=FNS, mode="jvp"):
    opt = torch.optim.SGD(lcn.parameters(), lr=0.0)
    out = mlc_step(model, lcn, opt, batch, meta, alpha=alpha, meta_params=names, fns=fns, mode=mode)
    return torch.cat([p.grad.reshape(-1) for p in lcn.parameters()]), out


def _mlc_meta_loss_reference(model, lcn, batch, meta, *, alpha, names):
    """L_meta(ŵ(θ)) the plain way: ŵ = w − α ∇_w mean_i CE_soft(f(x_i; w), ŷ_i(θ)) on a real parameter copy."""
    feats, logits = _forward(model, batch.inputs)
    soft = lcn(feats.detach(), batch.labels).detach()
    train_loss = -(soft * F.log_softmax(logits, -1)).sum(-1).mean()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(train_loss, [params[n] for n in names])
    stepped = copy.deepcopy(model)
    sp = dict(stepped.named_parameters())
    with torch.no_grad():
        for n, g in zip(names, grads, strict=True):
            sp[n].sub_(alpha * g)
    stepped.eval()
    _, mlogits = _forward(stepped, meta.inputs)
    return F.cross_entropy(mlogits, meta.labels).item()


@pytest.mark.parametrize(
    ("spec", "mode"), [("all", "jvp"), ("all", "unrolled"), ("head", "jvp"), ("head", "unrolled"), ("last-1", "jvp")]
)
def test_mlc_theta_gradient_matches_central_finite_differences(spec, mode):
    model, lcn = _bert(), _lcn()
    batch, meta = _batch(6, 1, curves=False), _batch(5, 2, curves=False)
    alpha, eps = 3.0, 1e-5
    names = resolve_meta_params(model, spec, "classifier.")
    grad, _ = _mlc_theta_grad(model, lcn, batch, meta, alpha=alpha, names=names, mode=mode)
    assert grad.abs().max() > 1e-6  # a live LCN, not a vacuous comparison
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        d = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in lcn.parameters()]
        vals = []
        for sign in (1, -1):
            moved = copy.deepcopy(lcn)
            with torch.no_grad():
                for p, dp in zip(moved.parameters(), d, strict=True):
                    p.add_(sign * eps * dp)
            vals.append(_mlc_meta_loss_reference(model, moved, batch, meta, alpha=alpha, names=names))
        fd = (vals[0] - vals[1]) / (2 * eps)
        analytic = float(grad @ torch.cat([x.reshape(-1) for x in d]))
        assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_mlc_jvp_and_unrolled_agree_with_dropout_on():
    """The forward-mode pass replays the training forward's dropout masks, so both modes give one gradient."""
    batch, meta = _batch(6, 3, curves=False), _batch(5, 4, curves=False)
    grads = []
    for mode in ("jvp", "unrolled"):
        model = _bert(dropout=0.2)
        names = resolve_meta_params(model, "all", "classifier.")
        torch.manual_seed(123)
        g, _ = _mlc_theta_grad(model, _lcn(), batch, meta, alpha=2.0, names=names, mode=mode)
        grads.append(g)
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-8, atol=1e-12)


def test_mlc_real_step_trains_on_the_updated_soft_labels():
    model, lcn = _bert(), _lcn()
    batch, meta = _batch(6, 1, curves=False), _batch(5, 2, curves=False)
    names = resolve_meta_params(model, "all", "classifier.")
    before = copy.deepcopy(lcn)
    opt = torch.optim.Adam(lcn.parameters(), lr=1e-2)
    out = mlc_step(model, lcn, opt, batch, meta, alpha=1.0, meta_params=names, fns=FNS)
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        feats, logits = _forward(model, batch.inputs)
        soft = lcn(feats, batch.labels)  # the *updated* θ
        old = before(feats, batch.labels)
        expected = -(soft * torch.log_softmax(logits, -1)).sum(-1)
    assert not torch.allclose(soft, old)  # θ moved, and the real step uses where it moved to
    assert torch.allclose(out.soft_labels, soft, rtol=0, atol=1e-14)
    assert torch.allclose(out.soft_labels.sum(-1), torch.ones(6, dtype=torch.float64))
    assert torch.allclose(out.losses, expected, rtol=1e-12)
    assert out.loss.item() == pytest.approx(expected.mean().item(), rel=1e-12)
    assert out.meta_loss is not None
    out.loss.backward()
    assert model.classifier.weight.grad is not None
    # between --meta-interval steps θ stays, and the loss is against the current soft labels
    fixed = copy.deepcopy(lcn)
    again = mlc_step(model, lcn, None, batch, None, alpha=1.0, meta_params=names, fns=FNS, update_meta=False)
    assert all(torch.equal(a, b) for a, b in zip(fixed.parameters(), lcn.parameters(), strict=True))
    assert again.meta_loss is None and torch.allclose(again.losses, expected, rtol=1e-12)


@pytest.mark.parametrize("mode", ["jvp", "unrolled"])
def test_mlc_meta_share_adds_the_meta_batch_to_the_real_step_gradient(mode):
    """--meta-share applies to mlc as to the other meta methods: the real step's classifier gradient is that of
    mean CE_soft(ŷ(θ_new)) + S · mean CE(meta batch), and the LCN's step is the one without the share."""
    batch, meta = _batch(6, 1, curves=False), _batch(5, 2, curves=False)
    names = resolve_meta_params(_bert(), "all", "classifier.")
    outs, lcns = [], []
    for share in (0.0, 0.5):
        model, lcn = _bert(), _lcn()
        opt = torch.optim.Adam(lcn.parameters(), lr=1e-2)
        kwargs = {"clean_batch": meta, "clean_share": share}
        outs.append(
            (model, mlc_step(model, lcn, opt, batch, meta, alpha=1.0, meta_params=names, fns=FNS, mode=mode, **kwargs))
        )
        lcns.append(torch.cat([p.detach().reshape(-1) for p in lcn.parameters()]))
    torch.testing.assert_close(lcns[0], lcns[1], rtol=1e-12, atol=1e-14)
    (_, paper), (model, out) = outs
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss, params)
    feats, logits = _forward(model, batch.inputs)
    soft_ce = -(out.soft_labels * torch.log_softmax(logits, -1)).sum(-1).mean()
    clean = F.cross_entropy(_forward(model, meta.inputs)[1], meta.labels)
    want = torch.autograd.grad(soft_ce + 0.5 * clean, params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert out.loss.item() == pytest.approx(paper.loss.item() + 0.5 * clean.item(), rel=1e-12)


@pytest.mark.parametrize("mode", ["jvp", "unrolled"])
def test_mlc_meta_share_at_w_hat_adds_the_meta_losss_gradient_at_w_hat(mode):
    """mlc with --meta-share-at w-hat: the soft-label loss's gradient plus S × ∇ mean CE(meta batch) at ŵ, ŵ the
    virtual step on the soft labels of the LCN before its update."""
    model, lcn = _bert(), _lcn()
    batch, meta = _batch(6, 1, curves=False), _batch(5, 2, curves=False)
    feats, _ = _forward(model, batch.inputs)
    with torch.no_grad():
        soft_old = lcn(feats, batch.labels)
    soft_ce = lambda z: soft_cross_entropy(z, soft_old).mean()  # noqa: E731
    _, g_hat = _virtual_step_grad(model, batch, meta, soft_ce, alpha=1.0)
    names = resolve_meta_params(model, "all", "classifier.")
    opt = torch.optim.Adam(lcn.parameters(), lr=1e-2)
    kwargs = {"clean_batch": meta, "clean_share": 0.5, "clean_share_at": "w-hat"}
    out = mlc_step(model, lcn, opt, batch, meta, alpha=1.0, meta_params=names, fns=FNS, mode=mode, **kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss, params)
    logits = _forward(model, batch.inputs)[1]
    want = torch.autograd.grad(soft_cross_entropy(logits, out.soft_labels).mean(), params)
    for g, w, h in zip(got, want, g_hat, strict=True):
        torch.testing.assert_close(g, w + 0.5 * h, rtol=1e-9, atol=1e-12)


def test_soft_cross_entropy_of_a_one_hot_label_is_the_cross_entropy():
    logits = torch.randn(5, C, generator=torch.Generator().manual_seed(0)).bfloat16()
    labels = torch.tensor([0, 1, 2, 1, 0])
    soft = soft_cross_entropy(logits, F.one_hot(labels, C).float())
    assert soft.dtype == torch.float32
    torch.testing.assert_close(soft, F.cross_entropy(logits.float(), labels, reduction="none"))


def test_lcn_gives_soft_labels_and_is_rebuilt_from_its_spec():
    lcn = _lcn().float()
    g = torch.Generator().manual_seed(0)
    feats, labels = 10 * torch.randn(32, 16, generator=g), torch.randint(0, C, (32,), generator=g)
    y = lcn(feats, labels)
    assert y.shape == (32, C) and bool((y >= 0).all()) and torch.allclose(y.sum(-1), torch.ones(32))
    rebuilt = build_meta_net(lcn.spec())
    assert type(rebuilt) is LabelCorrectionNet
    rebuilt.load_state_dict(lcn.state_dict())
    assert torch.equal(rebuilt(feats, labels), y)


@pytest.mark.parametrize(("spec", "mode"), [("head", "jvp"), ("head", "unrolled"), ("all", "jvp")])
def test_mlc_takes_lower_precision_features_and_logits_from_the_real_forward(spec, mode):
    """Under bf16 autocast (CUDA) the real forward's features and logits are not in the LCN's or the head's dtype;
    the LCN, the head-only replay and the soft-label losses cast them and give the same θ step."""
    model, batch, meta = _bert(), _batch(6, 0, curves=False), _batch(4, 1, curves=False)
    names = resolve_meta_params(model, spec, "classifier.")
    exact, _ = _mlc_theta_grad(model, _lcn(), batch, meta, alpha=2.0, names=names, mode=mode)
    lcn = _lcn()
    low = lambda m, inputs: tuple(t.float() for t in _forward(m, inputs))  # noqa: E731
    fns = ClassifierFns(forward=low, head=_head, head_prefix="classifier.")
    opt = torch.optim.SGD(lcn.parameters(), lr=0.0)
    real = lambda inputs: low(model, inputs)  # noqa: E731
    out = mlc_step(model, lcn, opt, batch, meta, alpha=2.0, meta_params=names, fns=fns, real_forward=real, mode=mode)
    lowered = torch.cat([p.grad.reshape(-1) for p in lcn.parameters()])
    assert exact.abs().max() > 0 and out.losses.dtype == torch.float32  # the logits' precision, at least float32
    torch.testing.assert_close(lowered, exact, rtol=1e-3, atol=1e-6)
