import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm import metrics
from ldm.errors import UserError
from ldm.metrics import (LPIPS, Extractor, FrechetAccumulator, RunningGaussian, frechet_distance, gaussian_stats,
                         abs_sums, frame_change, information_preservation, psnr, reconstruction_scores, ssim,
                         ssim_per_frame, temporal_error)

# ------------------------------------------------------------------------------------ PSNR


@pytest.mark.parametrize("delta", [0.1, 0.05, 0.01])
def test_psnr_constant_offset(delta):
    x = torch.rand(3, 3, 4, 16, 16) * 0.5
    got = psnr(x, x + delta, data_range=1.0)
    assert got.shape == (3,)
    torch.testing.assert_close(got, torch.full((3,), 20 * math.log10(1 / delta), dtype=torch.float64),
                               rtol=0, atol=1e-4)


def test_psnr_default_range_and_identity():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    # an offset of 0.2 on [-1, 1] data is 0.1 of its range of 2
    torch.testing.assert_close(psnr(x, x + 0.2), torch.full((2,), 20.0, dtype=torch.float64), atol=1e-4, rtol=0)
    assert torch.isinf(psnr(x, x)).all()
    with pytest.raises(ValueError, match="shape"):
        psnr(x, x[:1])


# ------------------------------------------------------------------------------------ SSIM


def test_temporal_error_on_hand_made_frames():
    """Grey levels (0..255) of frame-to-frame change that the reconstruction adds or loses."""
    x = torch.zeros(1, 3, 4, 16, 16)
    x[:, :, :, :, 8:] = 0.5  # a still clip: half the frame grey
    assert temporal_error(x, (x - 0.3)).item() == 0.0  # the same error on every frame: no flicker
    flicker = x.clone()
    flicker[:, :, 1::2] += 0.2  # frames 1 and 3 brighter by 0.2 (25.5 grey levels): 3 changes of 25.5 each
    assert temporal_error(x, flicker).item() == pytest.approx(25.5)
    assert temporal_error(flicker, x).item() == pytest.approx(25.5)  # symmetric
    moving = torch.stack([torch.full((3, 16, 16), -1.0 + 0.4 * t) for t in range(4)], dim=1)[None]  # +51 a frame
    frozen = moving[:, :, :1].expand_as(moving)
    assert temporal_error(moving, frozen).item() == pytest.approx(51.0)  # a frozen clip loses all the motion
    both = torch.cat([x, flicker])
    assert temporal_error(both, torch.cat([flicker, flicker])).tolist() == pytest.approx([25.5, 0.0])  # per clip
    with pytest.raises(ValueError, match="T >= 2"):
        temporal_error(x[:, :, :1], x[:, :, :1])
    assert "temporal_error" in reconstruction_scores(x, flicker)
    assert "temporal_error" not in reconstruction_scores(x[:, :, :1], x[:, :, :1])  # one frame: not measured


def test_information_preservation_on_hand_made_frames():
    """IV-VAE App. A.1 Eq. 2, ``1 - sum |x - x'| / sum |x|``, pixels as intensities in [0, 1]: the clip's four
    pixels -1, 0, 1, 1 ([-1, 1]) are 0, 0.5, 1, 1 (sum 2.5); the reconstruction is off by 0.25 and 0.5 on two."""
    x = torch.tensor([-1.0, 0.0, 1.0, 1.0]).reshape(1, 1, 2, 1, 2)  # (B, C, T, H, W)
    y = torch.tensor([-1.0, 0.5, 0.0, 1.0]).reshape(1, 1, 2, 1, 2)
    error, total = abs_sums(x, y)
    assert (error.item(), total.item()) == (0.75, 2.5)
    assert information_preservation(error, total).item() == pytest.approx(0.7, abs=1e-12)  # 1 - 0.75 / 2.5
    x8, y8 = (x + 1) * 127.5, (y + 1) * 127.5  # in [0, 255]: the same value (the ratio does not change with scale)
    assert 1 - ((x8 - y8).abs().sum() / x8.sum()).item() == pytest.approx(0.7)
    black = -torch.ones(1, 1, 2, 1, 2)  # sum |x| = 0: 1 when exact, -inf otherwise
    assert information_preservation(*abs_sums(black, black)).item() == 1.0
    assert information_preservation(*abs_sums(black, black + 0.2)).item() == -math.inf
    tile = lambda v: v.repeat(1, 3, 1, 11, 6)  # RGB 11x12 frames of the same pixels (SSIM's window): the same ratio
    scores = reconstruction_scores(tile(torch.cat([x, black])), tile(torch.cat([y, black])))  # per clip; the paper's
    assert scores["info_preservation"].tolist() == pytest.approx([0.7, 1.0])
    assert information_preservation(scores["abs_error"].sum(), scores["abs_sum"].sum()).item() == pytest.approx(0.7)


def test_frame_change_on_hand_made_frames():
    """Grey levels (0..255) between consecutive frames, per clip."""
    still = torch.full((1, 3, 4, 8, 8), 0.3)
    moving = torch.stack([torch.full((3, 8, 8), -1.0 + 0.4 * t) for t in range(4)], dim=1)[None]  # +51 a frame
    half = moving.clone()
    half[..., :4] = -1.0  # half the pixels still: half the change
    assert frame_change(torch.cat([still, moving, half])).tolist() == pytest.approx([0.0, 51.0, 25.5])
    assert frame_change(moving, data_range=1.0).item() == pytest.approx(102.0)  # pixels in [0, 1]
    with pytest.raises(ValueError, match="T >= 2"):
        frame_change(still[:, :, :1])


def test_ssim_identity_is_one_for_images_and_videos():
    img = torch.rand(2, 3, 24, 20) * 2 - 1
    vid = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    torch.testing.assert_close(ssim(img, img), torch.ones(2, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(ssim(vid, vid), torch.ones(2, dtype=torch.float64), atol=1e-12, rtol=0)


def test_ssim_decreases_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=g)
    noise = torch.randn(1, 3, 32, 32, generator=g)
    scores = [ssim(x, x + s * noise, data_range=1.0).item() for s in (0.02, 0.05, 0.1, 0.3)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert scores[0] < 1.0 and scores[-1] < 0.8


def test_ssim_constant_images_closed_form():
    # zero variance: SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, r = 0.3, 0.7, 1.0
    c1 = (0.01 * r) ** 2
    got = ssim(torch.full((1, 1, 16, 16), a, dtype=torch.float64),
               torch.full((1, 1, 16, 16), b, dtype=torch.float64), data_range=r)
    assert got.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)


def test_ssim_matches_direct_gaussian_window():
    # an 11x11 frame has exactly one valid window position: compare with a direct weighted sum
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(1, 1, 11, 11, generator=g), torch.rand(1, 1, 11, 11, generator=g)
    r = torch.arange(11, dtype=torch.float64) - 5
    w1 = torch.exp(-r ** 2 / (2 * 1.5 ** 2))
    w = torch.outer(w1, w1)
    w = w / w.sum()
    xd, yd = x[0, 0].double(), y[0, 0].double()
    mx, my = (w * xd).sum(), (w * yd).sum()
    vx, vy = (w * (xd - mx) ** 2).sum(), (w * (yd - my) ** 2).sum()
    cxy = (w * (xd - mx) * (yd - my)).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ref = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    assert ssim(x, y, data_range=1.0).item() == pytest.approx(ref.item(), abs=1e-9)


def test_ssim_per_frame_and_video_average():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 4, 16, 16, generator=g)
    y = x.clone()
    y[:, :, 2] += 0.2 * torch.randn(2, 3, 16, 16, generator=g)
    per = ssim_per_frame(x, y, data_range=1.0)
    assert per.shape == (2, 4)
    assert torch.allclose(per[:, [0, 1, 3]], torch.ones(2, 3, dtype=torch.float64))
    assert (per[:, 2] < 0.9).all()
    torch.testing.assert_close(ssim(x, y, data_range=1.0), per.mean(1))
    frame2 = ssim(x[:, :, 2], y[:, :, 2], data_range=1.0)
    torch.testing.assert_close(per[:, 2], frame2)


def test_ssim_rejects_small_frames_and_bad_range():
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="data_range"):
        ssim(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), data_range=0.0)


# ------------------------------------------------------------------------------------ Fréchet


def _random_spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_fd_equal_covariances_is_mean_distance():
    s = _random_spd(16, 0)
    mu1, mu2 = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    assert frechet_distance(mu1, s, mu2, s) == pytest.approx(float(((mu1 - mu2) ** 2).sum()), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("c", [0.5, 2.0, 3.0])
def test_fd_scaled_covariance(c):
    s = _random_spd(12, 1)
    mu = torch.zeros(12, dtype=torch.float64)
    assert frechet_distance(mu, s, mu, c * c * s) == pytest.approx((1 - c) ** 2 * float(torch.trace(s)), rel=1e-9)


def test_fd_commuting_covariances():
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    a = torch.rand(10, generator=g, dtype=torch.float64) * 3
    b = torch.rand(10, generator=g, dtype=torch.float64) * 3
    s1, s2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
    mu1, mu2 = torch.randn(10, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    # numpy inputs are accepted too
    assert frechet_distance(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy()) == pytest.approx(expected, rel=1e-9)


def test_fd_same_features_is_zero_even_rank_deficient():
    g = torch.Generator().manual_seed(4)
    for n, d in [(500, 16), (20, 64)]:  # the second covariance is singular (N < D)
        mu, s = gaussian_stats(torch.randn(n, d, generator=g) * 3 + 1)
        fd = frechet_distance(mu, s, mu, s)
        assert math.isfinite(fd) and abs(fd) < 1e-5


def test_fd_rejects_bad_input():
    s = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(torch.zeros(4), s, torch.zeros(3), s)
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(torch.tensor([0.0, float("nan"), 0, 0]), s, torch.zeros(4), s)


def test_gaussian_stats_is_unbiased():
    x = torch.randn(50, 6, dtype=torch.float64)
    mu, s = gaussian_stats(x)
    np.testing.assert_allclose(mu.numpy(), x.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.numpy(), np.cov(x.numpy(), rowvar=False, ddof=1), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(torch.randn(1, 6))


def test_running_gaussian_matches_batch_and_merge():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(203, 8, generator=g, dtype=torch.float64) + 1e4  # large offset: stable update
    mu, s = gaussian_stats(x)
    a, b = RunningGaussian(8), RunningGaussian(8)
    for chunk in x[:120].split(17):
        a.update(chunk)
    for chunk in x[120:].split(40):
        b.update(chunk)
    a.merge(b)
    mu2, s2 = a.stats()
    assert a.n == 203
    torch.testing.assert_close(mu2, mu, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(s2, s, rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        RunningGaussian(8).stats()


def test_frechet_accumulators_of_two_ranks_merge_into_the_one_of_all_clips():
    """Clips split between two accumulators (as ranks take every other batch), merged: the same
    sums, distance and reference halves (by clip number) as one accumulator that saw them all."""
    ext = Extractor("torchscript", Path("stand-in.pt"), "0", None, torch.device("cpu"), 4)

    def acc():
        return FrechetAccumulator(ext, lambda x: x, {}, 2048, "clips", split_half=True)
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(11, 4, generator=g), torch.randn(11, 4, generator=g) + 0.5
    one, parts = acc(), [acc(), acc()]
    for start in range(0, 11, 3):  # batches of 3: batch b on "rank" b % 2
        rows = list(range(start, min(start + 3, 11)))
        for a in (one, parts[start // 3 % 2]):
            a.update("real", real[rows], index=rows)
            a.update("fake", fake[rows])
    merged = acc()
    merged.merge_states([p.state() for p in parts])
    assert all(p.stats["real"].n < 11 for p in parts) and merged.stats["real"].n == 11
    for side in one.stats:
        assert merged.stats[side].n == one.stats[side].n
        torch.testing.assert_close(merged.stats[side].mean, one.stats[side].mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged.stats[side].m2, one.stats[side].m2, rtol=1e-10, atol=1e-12)
    a, b = merged.result("fvd"), one.result("fvd")
    assert a["fvd"] == pytest.approx(b["fvd"], rel=1e-9)
    assert a["reference_split_half"]["fvd"] == pytest.approx(b["reference_split_half"]["fvd"], rel=1e-9)


# ------------------------------------------------------------------------------------ LPIPS

# torchvision's key layout, written out independently of ldm.metrics:
# (features index, in channels, out channels, kernel)
VGG16_CONVS = [(0, 3, 64, 3), (2, 64, 64, 3), (5, 64, 128, 3), (7, 128, 128, 3), (10, 128, 256, 3),
               (12, 256, 256, 3), (14, 256, 256, 3), (17, 256, 512, 3), (19, 512, 512, 3),
               (21, 512, 512, 3), (24, 512, 512, 3), (26, 512, 512, 3), (28, 512, 512, 3)]
ALEX_CONVS = [(0, 3, 64, 11), (3, 64, 192, 5), (6, 192, 384, 3), (8, 384, 256, 3), (10, 256, 256, 3)]
HEAD_CHANNELS = {"vgg": [64, 128, 256, 512, 512], "alex": [64, 192, 384, 256, 256]}


def _write_weights(tmp_path, net: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    backbone = {}
    for i, cin, cout, k in (VGG16_CONVS if net == "vgg" else ALEX_CONVS):
        backbone[f"features.{i}.weight"] = torch.randn(cout, cin, k, k, generator=g) * math.sqrt(2 / (cin * k * k))
        backbone[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.01
    backbone["classifier.1.weight"] = torch.randn(10, 4, generator=g)  # present in real files; ignored
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
             for i, c in enumerate(HEAD_CHANNELS[net])}
    bp, hp = tmp_path / f"{net}_backbone.pth", tmp_path / f"{net}.pth"
    torch.save(backbone, bp)
    torch.save(heads, hp)
    return bp, hp, backbone, heads


def _alex_reference(x, y, backbone, heads, flow=None):
    """LPIPS Eq. 1 written directly with functional ops; with ``flow`` (N, 2, H, W), FloLPIPS's weighting of
    each layer: the flow resized bilinearly to it, its magnitude normalised to sum 1 (Danier et al. 2022)."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(v):
        w = lambda i: (backbone[f"features.{i}.weight"], backbone[f"features.{i}.bias"])  # noqa: E731
        h = (v - shift) / scale
        out = [F.relu(F.conv2d(h, *w(0), stride=4, padding=2))]
        out.append(F.relu(F.conv2d(F.max_pool2d(out[-1], 3, 2), *w(3), padding=2)))
        out.append(F.relu(F.conv2d(F.max_pool2d(out[-1], 3, 2), *w(6), padding=1)))
        out.append(F.relu(F.conv2d(out[-1], *w(8), padding=1)))
        out.append(F.relu(F.conv2d(out[-1], *w(10), padding=1)))
        return [f / (f.norm(dim=1, keepdim=True) + 1e-10) for f in out]

    total = 0
    for i, (a, b) in enumerate(zip(feats(x), feats(y))):
        d = ((a - b) ** 2 * heads[f"lin{i}.model.1.weight"]).sum(1)  # (N, h, w)
        if flow is None:
            total = total + d.mean((1, 2))
        else:
            m = F.interpolate(flow, size=d.shape[-2:], mode="bilinear", align_corners=False).norm(dim=1)
            total = total + (d * m / m.sum((1, 2), keepdim=True)).sum((1, 2))
    return total


def test_lpips_alex_loads_and_matches_reference(tmp_path):
    bp, hp, backbone, heads = _write_weights(tmp_path, "alex")
    m = LPIPS.from_files("alex", bp, hp)
    assert torch.equal(m.features[3].weight, backbone["features.3.weight"])
    assert torch.equal(m.heads[2].weight, heads["lin2.model.1.weight"])
    assert not any(p.requires_grad for p in m.parameters())
    g = torch.Generator().manual_seed(7)
    x, y = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    d = m(x, y)
    assert d.shape == (2,)
    torch.testing.assert_close(d, _alex_reference(x, y, backbone, heads), rtol=1e-4, atol=1e-6)


class _FrameFlow(nn.Module):
    """A stand-in optical-flow network with the contract of `load_flow_net`: per pixel, the change of the mean
    and of the red level from frame0 to frame1 (frames in [0, 1])."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([(b - a).mean(1, keepdim=True), (b - a)[:, :1] * 3.0], 1)


def test_flolpips_weights_lpips_where_the_motion_differs(tmp_path):
    """FloLPIPS (H3AE Tab. 4 / 5): per frame t < T-1, LPIPS with each layer's map weighted by the magnitude of the
    difference between the originals' and the reconstruction's flow from t to t+1, as the reference writes it;
    uniform or zero flow differences give plain LPIPS, the scale does not matter; the flow network is a user's
    TorchScript file that must keep its contract (was: no FloLPIPS)."""
    from ldm.metrics import flolpips, flow_weights, load_flow_net, optical_flow
    bp, hp, backbone, heads = _write_weights(tmp_path, "alex")
    m = LPIPS.from_files("alex", bp, hp)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    flow = torch.randn(2, 2, 64, 64, generator=g)
    torch.testing.assert_close(m.distance(x, y, flow=flow), _alex_reference(x, y, backbone, heads, flow),
                               rtol=1e-4, atol=1e-6)
    for same in (torch.ones(2, 2, 64, 64), torch.zeros(2, 2, 64, 64)):  # uniform: LPIPS; zero: LPIPS, not NaN
        torch.testing.assert_close(m.distance(x, y, flow=same), m(x, y), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(m.distance(x, y, flow=flow * 10), m.distance(x, y, flow=flow), rtol=1e-5, atol=1e-7)
    assert flow_weights(flow, (8, 8)).sum((1, 2, 3)).tolist() == pytest.approx([1.0, 1.0])
    y_left = x.clone()
    y_left[..., :32] = y[..., :32]  # the reconstruction differs in the left half only
    left, right = torch.zeros(2, 2, 64, 64), torch.zeros(2, 2, 64, 64)
    left[:, 0, :, :24], right[:, 0, :, 40:] = 1.0, 1.0
    plain = m(x, y_left)
    assert (m.distance(x, y_left, flow=left) > 1.5 * plain).all() and (m.distance(x, y_left, flow=right) < plain).all()

    path = tmp_path / "flow.pt"
    torch.jit.save(torch.jit.script(_FrameFlow()), str(path))
    net = load_flow_net(path)
    assert net.dim == 2 and net.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    clips = torch.rand(2, 3, 4, 64, 64, generator=g) * 2 - 1
    recon = (clips + 0.3 * torch.randn(2, 3, 4, 64, 64, generator=g)).clamp(-1, 1)
    frames = lambda v, t: v[:, :, t]  # noqa: E731
    flow_of = lambda v, t: _FrameFlow()((frames(v, t) + 1) / 2, (frames(v, t + 1) + 1) / 2)  # noqa: E731
    expected = torch.stack([_alex_reference(frames(clips, t), frames(recon, t), backbone, heads,
                                            flow_of(clips, t) - flow_of(recon, t)) for t in range(3)]).mean(0)
    torch.testing.assert_close(flolpips(m, net, clips, recon), expected, rtol=1e-4, atol=1e-6)
    assert flolpips(m, net, clips, clips).tolist() == [0.0, 0.0]
    scores = metrics.reconstruction_scores(clips, recon, m, net)
    torch.testing.assert_close(scores["flolpips"], expected, rtol=1e-4, atol=1e-6)
    assert "flolpips" not in metrics.reconstruction_scores(clips[:, :, :1], recon[:, :, :1], m, net)  # one frame
    with pytest.raises(ValueError, match="FloLPIPS weights LPIPS"):
        metrics.reconstruction_scores(clips, recon, None, net)
    with pytest.raises(ValueError, match="2 frames or more"):
        flolpips(m, net, clips[:, :, :1], recon[:, :, :1])

    class _NotFlow(nn.Module):  # one channel: not a flow field
        def forward(self, a: Tensor, b: Tensor) -> Tensor:
            return (b - a).mean(1, keepdim=True)

    torch.jit.save(torch.jit.script(_NotFlow()), str(tmp_path / "not_flow.pt"))
    with pytest.raises(ValueError, match=r"not_flow.pt returned \(1, 1, 64, 64\) for 1 frame pair\(s\) of 64x64; "
                                         r"expected module\(frame0, frame1\)"):
        load_flow_net(tmp_path / "not_flow.pt")
    with pytest.raises(ValueError, match="not a TorchScript archive"):
        load_flow_net(hp)
    with pytest.raises(FileNotFoundError, match="optical-flow network"):
        load_flow_net(tmp_path / "missing.pt")
    assert optical_flow(net, x, y).shape == (2, 2, 64, 64)


def test_lpips_vgg_properties(tmp_path):
    bp, hp, backbone, heads = _write_weights(tmp_path, "vgg")
    m = LPIPS.from_files("vgg", bp, hp)
    for i, *_ in VGG16_CONVS:
        assert torch.equal(m.features[i].weight, backbone[f"features.{i}.weight"])
    g = torch.Generator().manual_seed(8)
    x = torch.rand(2, 3, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert torch.equal(m(x, x), torch.zeros(2))
    d = m(x, y)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(d, m(y, x))
    per_frame = torch.stack([m(x[:, :, t], y[:, :, t]) for t in range(3)], 1)
    torch.testing.assert_close(d, per_frame.mean(1))
    # farther images are farther
    z = (x + 0.8 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert (m(x, z) > d).all()


def test_lpips_errors(tmp_path):
    bp, hp, backbone, heads = _write_weights(tmp_path, "alex")
    missing = tmp_path / "nowhere" / "alexnet.pth"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LPIPS.from_files("alex", missing, hp)
    with pytest.raises(FileNotFoundError, match="no_heads.pth"):
        LPIPS.from_files("alex", bp, tmp_path / "no_heads.pth")
    partial = dict(backbone)
    del partial["features.8.weight"]
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"features\.8\.weight"):
        LPIPS.from_files("alex", tmp_path / "partial.pth", hp)
    bad = dict(heads)
    bad["lin1.model.1.weight"] = torch.rand(1, 7, 1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="lin1"):
        LPIPS.from_files("alex", bp, tmp_path / "bad.pth")
    # a user's mix-ups are one-line UserErrors (were tracebacks: ValueError, UnpicklingError, KeyError)
    with pytest.raises(UserError, match="lacks 10 of the alex trunk's 10 tensors.*the two files are swapped"):
        LPIPS.from_files("alex", hp, bp)
    torch.save(LPIPS("alex"), tmp_path / "module.pth")  # a pickled module: never unpickled
    with pytest.raises(UserError, match="holds Python objects besides tensors"):
        LPIPS.from_files("alex", tmp_path / "module.pth", hp)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="is not a torch checkpoint"):
        LPIPS.from_files("alex", bp, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="unknown LPIPS net"):
        LPIPS("squeeze")
    m = LPIPS.from_files("alex", bp, hp)
    with pytest.raises(ValueError, match="3, H, W"):
        m(torch.rand(1, 1, 64, 64), torch.rand(1, 1, 64, 64))
