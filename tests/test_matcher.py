import pytest
import torch

from registration import tps
from registration.config import LocalizerConfig, MatcherConfig
from registration.localizer import Localizer
from registration.losses import fold_penalty, matcher_loss
from registration.matcher import Matcher


def _reference_refine(model, moving, fixed, p0, steps, lr=0.02, coarse=None):
    """Refinement written the plain way: autograd through tps_grid and matcher_loss, torch Adam.
    coarse: take the grid on a coarse×coarse lattice, interpolated at the fixed pixels."""
    from registration.coords import identity_grid
    p = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=lr)
    size = tuple(fixed.shape[-2:])
    for _ in range(steps):
        if coarse is None:
            grid = tps.tps_grid(p, model.ctrl, size)
        else:
            g = tps.tps_grid(p, model.ctrl, (coarse, coarse)).permute(0, 3, 1, 2)
            at = identity_grid(size)[None].expand(len(p), -1, -1, -1)
            grid = torch.nn.functional.grid_sample(g, at, mode="bilinear", padding_mode="border",
                                                   align_corners=False).permute(0, 2, 3, 1)
        warped = tps.warp_image(moving, grid)
        _, offsets = tps.split_params(p, model.n_ctrl)
        sup = model.cfg.fold_supersample
        loss, _ = matcher_loss(warped, fixed, offsets, grid, model.cfg.smooth_weight,
                               model.cfg.fold_weight if sup == 1 else 0.0, model.cfg.fold_margin)
        if sup > 1:                      # folding judged on a finer grid than the pixels
            fine = tps.tps_grid(p, model.ctrl, (sup * size[0], sup * size[1]))
            loss = loss + model.cfg.fold_weight * fold_penalty(fine, model.cfg.fold_margin).mean()
        opt.zero_grad()
        (loss * len(p)).backward()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("margin,supersample", [(0.0, 1), (0.3, 1), (0.3, 2)])
def test_fast_refinement_equals_the_plain_autograd_version(margin, supersample):
    torch.manual_seed(0)
    model = Matcher(MatcherConfig(grid_size=4, smooth_weight=0.5, fold_weight=2.0,
                                  fold_margin=margin, fold_supersample=supersample))
    moving = (torch.rand(3, 1, 28, 28) > 0.6).float()
    fixed = (torch.rand(3, 1, 20, 24) > 0.6).float()      # refinement works at any fixed size
    p0 = torch.randn(3, tps.n_params(4)) * 0.1               # some folding, so μ matters
    want = _reference_refine(model, moving, fixed, p0, steps=8)
    got = model.refine(moving, fixed, p0, steps=8, lr=0.02)
    assert (want - p0).abs().max() > 0.05                    # the steps did move the parameters
    assert torch.allclose(got, want, atol=1e-4)


def test_refinement_against_a_larger_fixed_mask_interpolates_the_crop_grid():
    """Fixed masks with more pixels than the S×S input: the grid is taken on the S×S pixel
    centres and interpolated at the fixed pixels (as the pipeline pastes), equal to autograd
    through the same interpolation; interpolate=False evaluates the spline at every pixel.
    (Seed 2: on some random-noise masks a parameter's gradient is ~1e-9, and Adam turns the
    two implementations' rounding there into full steps of opposite sign.)"""
    torch.manual_seed(2)
    model = Matcher(MatcherConfig(grid_size=4, smooth_weight=0.5, fold_weight=2.0,
                                  fold_margin=0.3))
    moving = (torch.rand(2, 1, 28, 28) > 0.6).float()
    fixed = (torch.rand(2, 1, 48, 40) > 0.6).float()
    p0 = torch.randn(2, tps.n_params(4)) * 0.1
    want = _reference_refine(model, moving, fixed, p0, steps=6, coarse=28)
    got = model.refine(moving, fixed, p0, steps=6, lr=0.02)
    assert (want - p0).abs().max() > 0.05
    assert torch.allclose(got, want, atol=1e-4)
    exact = model.refine(moving, fixed, p0, steps=6, lr=0.02, interpolate=False)
    assert torch.allclose(exact, _reference_refine(model, moving, fixed, p0, steps=6), atol=1e-4)
    assert not torch.allclose(exact, got, atol=1e-3)


def test_one_pass_predict_is_the_network_and_two_passes_compose():
    torch.manual_seed(0)
    model = Matcher(MatcherConfig(passes=2)).eval()
    torch.nn.init.normal_(model.head.weight, std=1e-3)       # a non-identity network
    m = (torch.rand(2, 1, 28, 28) > 0.7).float()
    f = (torch.rand(2, 1, 28, 28) > 0.7).float()
    with torch.no_grad():
        p1 = model(m, f)
        assert torch.allclose(model.predict(m, f, passes=1), p1)
        p2 = model(model.warp(m, p1), f)
        want = tps.compose_params(p1, p2, model.ctrl, _pixel_centres(28))
        assert torch.allclose(model.predict(m, f), want, atol=1e-4), (model.predict(m, f) - want).abs().max()


def _pixel_centres(s):
    from registration.coords import identity_grid
    return identity_grid((s, s)).reshape(-1, 2)


def _reference_localizer_forward(model, fixed, moving):
    """Conv → BN → ELU, then pool, layer by layer: Table 1 written out without the pooling
    reorder."""
    import torch.nn.functional as F
    x, emb = fixed, model.query(moving)
    outs = []
    for i, block in enumerate(model.blocks):
        if i > 0:
            x = F.max_pool2d(x, 2)
        x = block(x)
        if str(i) in model.film:
            gamma, beta = model.film[str(i)](emb)[..., None, None].chunk(2, dim=1)
            x = x * (1 + gamma) + beta
        if i in model.cfg.head_layers:
            outs.append(x)
    preds = [h(o).permute(0, 2, 3, 1).reshape(len(x), -1, 5) for o, h in zip(outs, model.heads)]
    p = torch.cat(preds, 1)
    return p[..., 0], p[..., 1:]


def test_localizer_pooling_reorder_and_folded_batchnorm_change_nothing():
    torch.manual_seed(0)
    model = Localizer(LocalizerConfig())
    for mod in model.modules():             # non-trivial BN statistics and FiLM
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    for lin in model.film.values():
        torch.nn.init.normal_(lin.weight, std=0.1)
    model.eval()
    fixed, moving = torch.rand(2, 1, 112, 112), torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        want = _reference_localizer_forward(model, fixed, moving)
        got = model(fixed, moving)
        fast = model.for_inference()(fixed, moving)
    for w, g, f in zip(want, got, fast):
        assert torch.allclose(g, w, atol=1e-5)
        assert torch.allclose(f, w, atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.for_inference().modules())


@pytest.mark.parametrize("kind", ["localizer", "matcher", "segnet", "segnet-frame"])
def test_frozen_inference_copy_equals_eager_and_leaves_training_to_eager(kind):
    """for_inference() freezes the forward pass (registration.frozen): same outputs at any
    batch size; with gradients on it runs the eager module, so the weights still learn."""
    torch.manual_seed(0)
    if kind == "localizer":
        model = Localizer(LocalizerConfig())
        args = (torch.rand(3, 1, 112, 112), torch.rand(3, 1, 28, 28))
    elif kind.startswith("segnet"):
        from registration.segnet import SegNet
        model = SegNet()
        for mod in model.modules():                   # BatchNorms that do something
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.3, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
        # the crop size it is traced at, and a whole non-square frame (Pipeline._frame_mask)
        args = (torch.rand(3, 1, 64, 64),) if kind == "segnet" else (torch.rand(1, 1, 128, 96),)
    else:
        model = Matcher(MatcherConfig(arch="flow"))
        torch.nn.init.normal_(model.flow.out.weight, std=0.1)     # not the identity
        args = (torch.rand(3, 1, 28, 28), torch.rand(3, 1, 28, 28))
    model.eval()
    fast = model.for_inference()
    assert fast.__dict__.get("_frozen") is not None
    # not a submodule: state_dict and modules() see only the network's own layers
    assert not any("owner" in k or "_frozen" in k for k in fast.state_dict())
    assert not any(isinstance(m, torch.jit.ScriptModule) for m in fast.modules())
    with torch.no_grad():
        want, got = model(*args), fast(*args)
    for w, g in zip(want if isinstance(want, tuple) else (want,),
                    got if isinstance(got, tuple) else (got,)):
        assert torch.allclose(w, g, atol=1e-4) and g.abs().max() > 0
    out = fast(*args)
    out = out[0] if isinstance(out, tuple) else out
    out.sum().backward()                                     # eager: gradients reach weights
    assert any(p.grad is not None for p in fast.parameters())


def test_part_labelled_matcher_takes_two_channels_and_starts_at_identity():
    from registration.config import MatcherConfig
    from registration.matcher import Matcher
    m = Matcher(MatcherConfig(input_size=32, mask_channels=2))
    x = torch.rand(3, 2, 32, 32)
    p = m.predict(x, x)
    assert torch.allclose(m.warp(x, p), x, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 2, 32, 32\)"):
        m(torch.rand(3, 1, 32, 32), torch.rand(3, 1, 32, 32))


def test_flow_matcher_starts_as_the_identity():
    model = Matcher(MatcherConfig(arch="flow", grid_size=6)).eval()
    m = (torch.rand(2, 1, 28, 28) > 0.6).float()
    with torch.no_grad():
        p = model.predict(m, torch.rand(2, 1, 28, 28))
        assert p.abs().max() == 0
        assert torch.allclose(model.warp(m, p), m, atol=1e-5)


def test_flow_projection_recovers_a_tps_from_its_displacement():
    """Known answer: the dense displacement of any TPS on the control grid projects back onto
    that same warp (the parameters may differ only by the affine/offset redundancy)."""
    torch.manual_seed(1)
    model = Matcher(MatcherConfig(arch="flow", grid_size=6))
    p = torch.randn(3, tps.n_params(6)) * 0.05
    grid = model.grid(p, (28, 28))
    disp = (grid - _pixel_centres(28).reshape(1, 28, 28, 2)).reshape(3, -1)
    back = disp @ model.flow_proj.T
    assert torch.allclose(model.grid(back, (28, 28)), grid, atol=1e-4)


@pytest.mark.parametrize("flow_scale", [1, 2, 4])
def test_flow_matcher_turns_a_constant_displacement_into_a_shift(flow_scale):
    model = Matcher(MatcherConfig(arch="flow", grid_size=4, flow_scale=flow_scale)).eval()
    cells = 28 // flow_scale                                   # the lattice the U-Net outputs
    assert model.flow_proj.shape == (tps.n_params(4), 2 * cells * cells)
    with torch.no_grad():
        model.flow.out.bias.copy_(torch.tensor([0.1, -0.2]))      # every pixel: (+0.1, −0.2)
        p = model(torch.zeros(1, 1, 28, 28), torch.zeros(1, 1, 28, 28))
        want = _pixel_centres(28).reshape(1, 28, 28, 2) + torch.tensor([0.1, -0.2])
        assert torch.allclose(model.grid(p, (28, 28)), want, atol=1e-5)


def test_matcher_rejects_an_unknown_architecture_or_flow_scale():
    with pytest.raises(ValueError, match="arch"):
        Matcher(MatcherConfig(arch="transformer"))
    with pytest.raises(ValueError, match="flow_scale"):
        Matcher(MatcherConfig(arch="flow", flow_scale=3))


def test_cached_grid_equals_the_tps_grid():
    torch.manual_seed(2)
    model = Matcher(MatcherConfig(grid_size=5))
    p = torch.randn(3, tps.n_params(5)) * 0.1
    for size in ((28, 28), (17, 40)):
        want = tps.tps_grid(p, model.ctrl, size)
        assert torch.allclose(model.grid(p, size), want, atol=1e-5)
        one = model.grid_numpy(p[1], size)                # one pair, compiled, for the app
        assert one.shape == (*size, 2) and one.flags.c_contiguous
        assert torch.allclose(torch.from_numpy(one), want[1], atol=1e-5)
    p64 = p.double().requires_grad_(True)                 # differentiable, any float dtype
    model.grid(p64, (9, 9)).sum().backward()
    assert p64.grad is not None and p64.grad.dtype == torch.float64


def test_refinement_of_a_batch_split_over_threads_equals_one_pair_at_a_time():
    torch.manual_seed(1)
    model = Matcher(MatcherConfig(grid_size=4, fold_weight=2.0, fold_margin=0.3))
    moving = (torch.rand(17, 1, 28, 28) > 0.6).float()
    fixed = (torch.rand(17, 1, 28, 28) > 0.6).float()
    p0 = torch.randn(17, tps.n_params(4)) * 0.1
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batch = model.refine(moving, fixed, p0, steps=4)          # 17 pairs over 2 threads
    finally:
        torch.set_num_threads(before)
    one = torch.cat([model.refine(moving[i:i + 1], fixed[i:i + 1], p0[i:i + 1], steps=4)
                     for i in range(17)])
    assert (batch - p0).abs().max() > 0.01
    assert torch.equal(batch, one)
