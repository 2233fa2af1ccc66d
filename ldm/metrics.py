"""Quality metrics: PSNR, SSIM, LPIPS and FloLPIPS (reconstruction), the Fréchet distance and the FVD / FID
feature protocols (extractors from user files), VBench's score aggregation and its model-free
temporal flickering.

Conventions: images are ``(B, C, H, W)`` and videos ``(B, C, T, H, W)``; the platform's pixel
range is [-1, 1], hence ``data_range=2.0`` by default. Per-sample metrics return ``(B,)``.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldm.checkpoint import file_sha256, read_state_dict
from ldm.errors import MissingInput, UserError, checking

# --------------------------------------------------------------------------------------------
# PSNR / SSIM
# --------------------------------------------------------------------------------------------


def _check_pair(x: Tensor, y: Tensor, data_range: float) -> None:
    if x.shape != y.shape:
        raise ValueError(f"inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim < 2:
        raise ValueError(f"expected a batch (B, ...), got shape {tuple(x.shape)}")
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio per sample, ``10 log10(R^2 / MSE)`` with the MSE over all
    elements of a sample (all frames of a video). Inputs ``(B, ...)``; returns ``(B,)`` float64;
    identical samples give ``inf``."""
    _check_pair(x, y, data_range)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)  # (B,)
    return 10.0 * torch.log10(data_range ** 2 / mse)


SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    r = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def _ssim_images(x: Tensor, y: Tensor, data_range: float) -> Tensor:
    """Mean SSIM per image (N,) of ``(N, C, H, W)`` inputs: Eq. 13 of Wang et al. 2004 on an
    11x11 Gaussian window (sigma 1.5), valid positions only, averaged over channels and space; computed in float64."""
    N, C, H, W = x.shape
    if H < SSIM_WINDOW or W < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {H}x{W}")
    x, y = x.double(), y.double()  # float32 moments lose ~1e-4 of SSIM to cancellation
    g = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA, x.device)
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (N, 5C, H, W)
    groups = stack.shape[1]
    stack = F.conv2d(stack, g.view(1, 1, -1, 1).expand(groups, 1, -1, 1).contiguous(), groups=groups)
    stack = F.conv2d(stack, g.view(1, 1, 1, -1).expand(groups, 1, 1, -1).contiguous(), groups=groups)
    mu_x, mu_y, e_xx, e_yy, e_xy = stack.chunk(5, dim=1)  # each (N, C, H', W')
    var_x, var_y, cov = e_xx - mu_x ** 2, e_yy - mu_y ** 2, e_xy - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def ssim_per_frame(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """SSIM of every frame: videos ``(B, C, T, H, W)`` -> ``(B, T)`` float64 (for per
    frame-position curves, IV-VAE Fig. 1b); images ``(B, C, H, W)`` -> ``(B, 1)``."""
    _check_pair(x, y, data_range)
    if x.ndim == 4:
        return _ssim_images(x, y, data_range)[:, None]
    if x.ndim != 5:
        raise ValueError(f"SSIM takes (B, C, H, W) or (B, C, T, H, W), got shape {tuple(x.shape)}")
    B, T = x.shape[0], x.shape[2]
    frames = lambda v: rearrange(v, "b c t h w -> (b t) c h w")  # noqa: E731
    return _ssim_images(frames(x), frames(y), data_range).view(B, T)  # (B, T)


def ssim(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Structural similarity per sample ``(B,)`` float64: Gaussian window 11, sigma 1.5,
    K1 0.01, K2 0.03, the given data range (Wang et al. 2004). Videos are averaged over frames."""
    return ssim_per_frame(x, y, data_range).mean(1)


def frame_change(x: Tensor, data_range: float = 2.0) -> Tensor:
    """How much a video changes from frame to frame, per video ``(B,)`` float64, in grey levels of a [0, 255]
    scale: the mean over consecutive frame pairs, channels and pixels of ``|x[t+1] - x[t]|``, times
    ``255 / data_range``. Videos ``(B, C, T, H, W)``, T >= 2. 0 for a still clip; motion and flicker both raise
    it (VBench's temporal flickering is about ``1 - frame_change / 255``, on frames quantised to uint8)."""
    if x.ndim != 5 or x.shape[2] < 2:
        raise ValueError(f"frame change needs videos (B, C, T >= 2, H, W), got shape {tuple(x.shape)}")
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    return x.double().diff(dim=2).abs().flatten(1).mean(1) * (255.0 / data_range)


def temporal_error(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """How differently ``y`` changes from frame to frame than ``x`` does, per video ``(B,)`` float64, in grey
    levels of a [0, 255] scale: the mean over consecutive frame pairs, channels and pixels of
    ``|(y[t+1] - y[t]) - (x[t+1] - x[t])|``, times ``255 / data_range`` (the `frame_change` of the error
    ``y - x``). Videos ``(B, C, T, H, W)``, T >= 2. 0 when ``y``'s error is the same on every frame (a steady
    blur or colour shift costs nothing); it grows with errors that change from frame to frame: flicker,
    jitter, boiling texture. A reconstruction that freezes a moving clip scores the clip's `frame_change`."""
    _check_pair(x, y, data_range)
    if x.ndim != 5 or x.shape[2] < 2:
        raise ValueError(f"temporal error needs videos (B, C, T >= 2, H, W), got shape {tuple(x.shape)}")
    return frame_change(y.double() - x.double(), data_range)


def abs_sums(x: Tensor, y: Tensor, data_range: float = 2.0) -> tuple[Tensor, Tensor]:
    """``(sum |x - y|, sum |x|)`` per sample ``(B,)`` float64, pixels as intensities in [0, 1] (``x``, ``y`` in
    ``[-data_range / 2, data_range / 2]``, shifted up by ``data_range / 2`` and divided by ``data_range``; 0: black):
    the two sums of IV-VAE's information preservation degree (`information_preservation`)."""
    _check_pair(x, y, data_range)
    x01 = (x.double() + data_range / 2) / data_range
    return (x.double() - y.double()).abs().flatten(1).sum(1) / data_range, x01.abs().flatten(1).sum(1)


def information_preservation(abs_error: Tensor, abs_sum: Tensor) -> Tensor:
    """IV-VAE's information preservation degree (App. A.1, Eq. 2), ``1 - sum |x - x'| / sum |x|``, of the sums of
    `abs_sums` (per clip, or summed over clips: the paper sums over all of them): 1 for an exact reconstruction,
    lower the more is lost, negative when the error outweighs the clip; a black clip (``sum |x| = 0``) gives 1
    when reconstructed exactly, else ``-inf``. Pixels are intensities in [0, 1] (the paper does not say; the value
    does not change with the scale, [0, 255] gives the same, but it does with the offset: in [-1, 1] a grey pixel
    would weigh 0)."""
    abs_error, abs_sum = abs_error.double(), abs_sum.double()
    ratio = torch.where(abs_error == 0, torch.zeros_like(abs_error), abs_error / abs_sum)
    return 1.0 - ratio


def reconstruction_scores(x: Tensor, y: Tensor, lpips: "LPIPS | None" = None,
                          flow_net: "Extractor | None" = None) -> dict[str, Tensor]:
    """Per-clip scores of reconstructions ``y`` of clips ``x`` (``(B, C, T, H, W)`` in [-1, 1]), the
    protocol of ``ldm eval recon`` and of ``ldm train-ae``'s validation: ``psnr`` (dB, over all
    frames), ``ssim_per_frame`` ``(B, T)``, ``info_preservation`` (`information_preservation`) with its two
    sums ``abs_error`` and ``abs_sum`` (`abs_sums`) and, for clips of 2 frames or more, ``temporal_error``
    (`temporal_error`, grey levels) in float64 on CPU, ``lpips`` ``(B,)`` (frames averaged) when an
    LPIPS network is given (computed on its device) and, with ``flow_net`` too, ``flolpips`` ``(B,)`` (`flolpips`;
    clips of 2 frames or more)."""
    x, y = x.float().cpu(), y.float().cpu()
    abs_error, abs_sum = abs_sums(x, y)
    scores = {"psnr": psnr(y, x), "ssim_per_frame": ssim_per_frame(y, x), "abs_error": abs_error, "abs_sum": abs_sum,
              "info_preservation": information_preservation(abs_error, abs_sum)}
    if x.ndim == 5 and x.shape[2] >= 2:
        scores["temporal_error"] = temporal_error(x, y)
    if lpips is not None:
        where = next(lpips.parameters()).device
        scores["lpips"] = lpips(y.to(where), x.to(where)).cpu()
    if flow_net is not None:
        if lpips is None:
            raise ValueError("FloLPIPS weights LPIPS: give an LPIPS network with the flow network")
        if x.ndim == 5 and x.shape[2] >= 2:
            scores["flolpips"] = flolpips(lpips, flow_net, x, y)
    return scores


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------


def _as_f64(a, name: str) -> Tensor:
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, Tensor) else a).detach().cpu().double()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has non-finite values")
    return t


def _sym(a: Tensor) -> Tensor:
    return 0.5 * (a + a.T)


def _sqrt_psd(a: Tensor) -> Tensor:
    """Square root of a symmetric PSD matrix by eigendecomposition; tiny negative eigenvalues
    (rounding) are clipped to zero."""
    w, v = torch.linalg.eigh(_sym(a))
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:

        ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)

    (Dowson & Landau 1982; the FID of Heusel et al. 2017, the FVD of Unterthiner et al. 2018).
    The trace term uses the symmetric form, whose eigenvalues are those of S1 S2, so only
    symmetric eigendecompositions are needed. Accepts tensors or arrays. A result below zero
    by rounding is returned as 0.
    """
    m1, m2 = _as_f64(mu1, "mu1"), _as_f64(mu2, "mu2")
    s1, s2 = _as_f64(sigma1, "sigma1"), _as_f64(sigma2, "sigma2")
    d = m1.shape[0]
    if m1.shape != (d,) or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"expected means (D,) and covariances (D, D); got {tuple(m1.shape)}, "
                         f"{tuple(s1.shape)}, {tuple(m2.shape)}, {tuple(s2.shape)}")
    r1 = _sqrt_psd(s1)
    ev = torch.linalg.eigvalsh(_sym(r1 @ s2 @ r1)).clamp(min=0)
    diff = m1 - m2
    fd = diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * ev.sqrt().sum()
    return max(float(fd), 0.0)


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(D,)`` and UNBIASED covariance ``(D, D)`` (divided by N - 1) of ``(N, D)`` features,
    in float64. Fréchet estimates are biased by the sample count: always report N."""
    f = _as_f64(features, "features")
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"gaussian_stats needs (N >= 2, D) features, got shape {tuple(f.shape)}")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


class RunningGaussian:
    """Streaming mean / covariance in float64 (Chan et al.'s pairwise update), so features can
    be accumulated batch by batch and per-rank accumulators merged (``merge``) in any order."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64)  # sum of centred outer products

    def _combine(self, n: int, mean: Tensor, m2: Tensor) -> None:
        if n == 0:
            return
        total = self.n + n
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + torch.outer(delta, delta) * (self.n * n / total)
        self.mean = self.mean + delta * (n / total)
        self.n = total

    def update(self, features: Tensor) -> None:
        f = _as_f64(features, "features")
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"expected (N, {self.dim}) features, got shape {tuple(f.shape)}")
        if f.shape[0] == 0:
            return
        mean = f.mean(0)
        c = f - mean
        self._combine(f.shape[0], mean, c.T @ c)

    def merge(self, other: "RunningGaussian") -> None:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dim {other.dim} into dim {self.dim}")
        self._combine(other.n, other.mean, other.m2)

    def state(self, prefix: str) -> dict[str, Tensor]:
        """The accumulated sums as tensors (``prefix.n``, ``.mean``, ``.m2``), to save and `load`."""
        return {f"{prefix}.n": torch.tensor([self.n]), f"{prefix}.mean": self.mean, f"{prefix}.m2": self.m2}

    def load(self, tensors: dict[str, Tensor], prefix: str) -> None:
        """Take the sums of `state` back (exactly: float64 throughout)."""
        mean, m2 = tensors[f"{prefix}.mean"].double(), tensors[f"{prefix}.m2"].double()
        if mean.shape != (self.dim,) or m2.shape != (self.dim, self.dim):
            raise ValueError(f"saved statistics of dim {mean.shape[0]} do not fit dim {self.dim}")
        self.n, self.mean, self.m2 = int(tensors[f"{prefix}.n"][0]), mean, m2

    def stats(self) -> tuple[Tensor, Tensor]:
        """(mean, unbiased covariance)."""
        if self.n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.n}")
        return self.mean.clone(), self.m2 / (self.n - 1)


# --------------------------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
# Metric"), Eq. 1: d(x, y) = sum_l mean_hw || w_l * (f_l(x) - f_l(y)) ||^2 over unit-normalised
# channel features of a frozen classification trunk.
# --------------------------------------------------------------------------------------------

# torchvision's `features` Sequential, index by index: ("conv", cin, cout, kernel, stride, pad),
# ("relu",), ("pool", kernel, stride). Keeping the indices makes torchvision's state-dict keys
# ("features.<i>.weight") load unchanged.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_ALEX = [("conv", 3, 64, 11, 4, 2), ("relu",), ("pool", 3, 2),
         ("conv", 64, 192, 5, 1, 2), ("relu",), ("pool", 3, 2),
         ("conv", 192, 384, 3, 1, 1), ("relu",),
         ("conv", 384, 256, 3, 1, 1), ("relu",),
         ("conv", 256, 256, 3, 1, 1), ("relu",)]


def _vgg16_layers() -> list[tuple]:
    layers, cin = [], 3
    for v in _VGG16:
        if v == "M":
            layers.append(("pool", 2, 2))
        else:
            layers += [("conv", cin, v, 3, 1, 1), ("relu",)]
            cin = v
    return layers


# LPIPS taps the ReLU outputs at these `features` indices (VGG: relu1_2 .. relu5_3).
LPIPS_NETS = {
    "vgg": dict(layers=_vgg16_layers, taps=(3, 8, 15, 22, 29), channels=(64, 128, 256, 512, 512),
                backbone_file="torchvision vgg16 weights (e.g. vgg16-397923af.pth)"),
    "alex": dict(layers=lambda: _ALEX, taps=(1, 4, 7, 9, 11), channels=(64, 192, 384, 256, 256),
                 backbone_file="torchvision alexnet weights (e.g. alexnet-owt-7be5be79.pth)"),
}
# The input scaling of the lpips package: per-channel shift/scale applied to [-1, 1] inputs.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


def _load_tensor_file(path: str | Path, what: str) -> dict[str, Tensor]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingInput(f"{what} not found: {str(p)!r}")
    with checking(what):
        return read_state_dict(p)


class LPIPS(nn.Module):
    """LPIPS distance with a VGG16 or AlexNet trunk written in plain torch (no torchvision).

    ``forward(x, y) -> (B,)`` for images ``(B, 3, H, W)`` or videos ``(B, 3, T, H, W)`` (frames
    averaged), pixels in [-1, 1]. Build with ``LPIPS.from_files``; weights are frozen.
    """

    def __init__(self, net: str = "vgg") -> None:
        super().__init__()
        if net not in LPIPS_NETS:
            raise ValueError(f"unknown LPIPS net {net!r}; expected one of {sorted(LPIPS_NETS)}")
        spec = LPIPS_NETS[net]
        self.net = net
        self.taps = spec["taps"]
        mods: list[nn.Module] = []
        for kind, *a in spec["layers"]()[: self.taps[-1] + 1]:
            if kind == "conv":
                cin, cout, k, s, p = a
                mods.append(nn.Conv2d(cin, cout, k, stride=s, padding=p))
            elif kind == "relu":
                mods.append(nn.ReLU())
            else:
                mods.append(nn.MaxPool2d(a[0], stride=a[1]))
        self.features = nn.Sequential(*mods)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in spec["channels"])
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)

    @classmethod
    def from_files(cls, net: str, backbone: str | Path, heads: str | Path) -> "LPIPS":
        """Load the torchvision backbone state dict (``features.<i>.weight/bias``; classifier
        keys ignored) and the lpips package's linear heads (``vgg.pth`` / ``alex.pth`` with keys
        ``lin<l>.model.<k>.weight`` of shape (1, C, 1, 1)). ``.pth`` files are read with
        ``torch.load(weights_only=True)``; ``.safetensors`` are accepted too."""
        model = cls(net)
        what = LPIPS_NETS[net]["backbone_file"]
        sd = _load_tensor_file(backbone, f"LPIPS backbone file ({what})")
        own = model.features.state_dict()
        missing = [k for k in own if f"features.{k}" not in sd]
        if missing:
            swapped = " (it holds LPIPS linear heads: the two files are swapped)" if any(
                re.fullmatch(r"lin\d+\.model\.\d+\.weight", k) for k in sd) else ""
            shown = ["features." + k for k in missing[:4]]
            raise UserError(f"LPIPS backbone file {str(backbone)!r} lacks {len(missing)} of the {net} trunk's "
                            f"{len(own)} tensors ({shown} ...); expected {what}{swapped}")
        model.features.load_state_dict({k: _checked(sd[f"features.{k}"], v.shape, f"features.{k}", backbone)
                                        for k, v in own.items()})
        hd = _load_tensor_file(heads, f"LPIPS linear-head file (the lpips package's {net}.pth)")
        found: dict[int, Tensor] = {}
        for k, v in hd.items():
            m = re.fullmatch(r"lin(\d+)\.model\.\d+\.weight", k)
            if m:
                found[int(m.group(1))] = v
        if sorted(found) != list(range(len(model.heads))):
            raise UserError(f"LPIPS head file {str(heads)!r} has heads {sorted(found)}; expected "
                            f"lin0..lin{len(model.heads) - 1} (lpips {net}.pth format)")
        for i, head in enumerate(model.heads):
            head.weight.copy_(_checked(found[i], head.weight.shape, f"lin{i}", heads))
        return model

    def distance(self, x: Tensor, y: Tensor, flow: Tensor | None = None) -> Tensor:
        """Differentiable LPIPS of image batches ``(N, 3, H, W)`` in [-1, 1] -> ``(N,)`` (the network
        itself stays frozen): use it as a perceptual loss; ``forward`` is the no-grad metric. ``flow``
        ``(N, 2, H, W)`` (FloLPIPS, `flolpips`): each layer's distance map is averaged with the weights of
        `flow_weights` instead of uniformly."""
        n = x.shape[0]
        h = (torch.cat([x, y]).float() - self.shift) / self.scale  # (2N, 3, H, W)
        total = torch.zeros(n, device=x.device)
        tap = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == self.taps[tap]:
                f = h / (h.pow(2).sum(1, keepdim=True) + 1e-20).sqrt()  # unit channel norm (finite grad at 0)
                d = self.heads[tap]((f[:n] - f[n:]).pow(2))  # (N, 1, h, w)
                total = total + (d.mean((1, 2, 3)) if flow is None else (d * flow_weights(flow, d.shape[-2:])).sum(
                    (1, 2, 3)))
                tap += 1
        return total

    @torch.no_grad()
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        _check_pair(x, y, 1.0)
        if x.ndim not in (4, 5) or x.shape[1] != 3:
            raise ValueError(f"LPIPS takes (B, 3, H, W) or (B, 3, T, H, W), got {tuple(x.shape)}")
        if x.ndim == 5:
            B, T = x.shape[0], x.shape[2]
            frames = lambda v: rearrange(v, "b c t h w -> (b t) c h w")  # noqa: E731
            return self.distance(frames(x), frames(y)).view(B, T).mean(1)  # (B,)
        return self.distance(x, y)


def flow_weights(flow: Tensor, size: Sequence[int]) -> Tensor:
    """FloLPIPS's spatial weights at a layer of ``size`` ``(h, w)``: the flow ``(N, 2, H, W)`` resized bilinearly
    (as a field of vectors), its magnitude normalised to sum to 1 per image -> ``(N, 1, h, w)``. An image whose
    flow is zero everywhere (both clips move alike) gets uniform weights: plain LPIPS (the reference divides by
    zero)."""
    v = F.interpolate(flow.float(), size=tuple(size), mode="bilinear", align_corners=False)
    magnitude = v.pow(2).sum(1, keepdim=True).sqrt()  # (N, 1, h, w)
    total = magnitude.sum((1, 2, 3), keepdim=True)
    uniform = torch.full_like(magnitude, 1.0 / magnitude[0].numel())
    return torch.where(total > 0, magnitude / total.clamp_min(torch.finfo(torch.float32).tiny), uniform)


@torch.no_grad()
def flolpips(lpips: LPIPS, flow_net: Extractor, x: Tensor, y: Tensor) -> Tensor:
    """FloLPIPS (Danier et al. 2022; a video autoencoder's reconstruction metric in H3AE Tab. 4 / 5) of
    reconstructions ``y`` of clips ``x`` (``(B, 3, T, H, W)`` in [-1, 1], T >= 2) -> ``(B,)``: for each frame
    ``t < T - 1``, LPIPS of the original and reconstructed frame ``t`` with each layer's map weighted by where
    their motion differs (`flow_weights` of ``flow(x_t -> x_t+1) - flow(y_t -> y_t+1)``, `optical_flow`),
    averaged over the T - 1 frames. Computed on the LPIPS network's device, one clip at a time."""
    _check_pair(x, y, 1.0)
    if x.ndim != 5 or x.shape[1] != 3 or x.shape[2] < 2:
        raise ValueError(f"FloLPIPS takes clips (B, 3, T, H, W) of 2 frames or more, got {tuple(x.shape)}")
    where = next(lpips.parameters()).device
    out = []
    for clip, recon in zip(x, y):  # (3, T, H, W) each
        a, b = clip.transpose(0, 1).to(where), recon.transpose(0, 1).to(where)  # (T, 3, H, W)
        motion = optical_flow(flow_net, a[:-1], a[1:]) - optical_flow(flow_net, b[:-1], b[1:])  # (T-1, 2, H, W)
        out.append(lpips.distance(a[:-1], b[:-1], flow=motion).mean())
    return torch.stack(out).cpu()


FLOW_CONTRACT = "module(frame0, frame1) -> (N, 2, H, W) flow, frames RGB (N, 3, H, W) in [0, 1]"


def load_flow_net(path: str | Path, device: str | torch.device = "cpu") -> Extractor:
    """FloLPIPS's optical-flow network from a user file: TorchScript, `FLOW_CONTRACT` (the flow from frame0 to
    frame1 in pixels; FloLPIPS was defined with PWC-Net; a scripted RAFT, or another network, wrapped to that
    contract works alike; only where the flows differ matters, not their scale). Probed on two 64x64 frames."""
    device = torch.device(device)
    p, module = _load_torchscript(path, "optical-flow network (TorchScript, e.g. a scripted PWC-Net)", device)
    net = Extractor("flow_torchscript", p, file_sha256(p), module, device)
    frames = torch.zeros(1, 3, 64, 64, device=device)
    net.dim = _probe(lambda: optical_flow(net, frames, frames), p, f"an optical-flow network ({FLOW_CONTRACT})")
    return net


@torch.no_grad()
def optical_flow(net: Extractor, a: Tensor, b: Tensor) -> Tensor:
    """The flow from frames ``a`` to frames ``b`` (``(N, 3, H, W)`` in [-1, 1]; the network sees [0, 1]) ->
    ``(N, 2, H, W)`` float32; ValueError when the network returns another shape."""
    out = net.module((a.float() + 1) / 2, (b.float() + 1) / 2)
    if not isinstance(out, Tensor) or tuple(out.shape) != (a.shape[0], 2, *a.shape[-2:]):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{net.path.name} returned {got} for {a.shape[0]} frame pair(s) of {a.shape[-2]}x"
                         f"{a.shape[-1]}; expected {FLOW_CONTRACT}")
    return out.float()


def _checked(t: Tensor, shape: torch.Size, key: str, path: str | Path) -> Tensor:
    if t.shape != shape:
        raise UserError(f"{key} in {str(path)!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t.float()


# --------------------------------------------------------------------------------------------
# FVD / FID: feature extractors from user files and the reference protocols
# --------------------------------------------------------------------------------------------
FVD_FRAMES = 16
FVD_SIZE = 224
FVD_PROTOCOL_N = 2048  # clips a side in the reference FVD protocol (and rFVD)
FID_PROTOCOL_N = 50_000  # FID's usual sample size (images; here video frames)


@dataclass
class Extractor:
    """A frozen feature network loaded from a user file, with what a result must record."""

    kind: str  # i3d_torchscript | torchscript | inception_torchscript
    path: Path
    sha256: str
    module: Any
    device: torch.device
    dim: int = 0

    def describe(self) -> dict[str, Any]:
        return {"extractor": self.kind, "weights": self.path.name, "sha256": self.sha256, "feature_dim": self.dim}


I3D_KINDS = ("i3d_torchscript", "torchscript")


def _load_torchscript(path: str | Path, what: str, device: torch.device) -> tuple[Path, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {str(p)!r}")
    try:
        module = torch.jit.load(str(p), map_location=device)
    except RuntimeError as e:
        raise ValueError(f"{what} {str(p)!r} is not a TorchScript archive ({str(e).splitlines()[0]}); "
                         "export it with torch.jit.script / torch.jit.save") from None
    return p, module.eval()


def load_i3d(path: str | Path, kind: str = "i3d_torchscript", device: str | torch.device = "cpu") -> Extractor:
    """The FVD feature network: ``i3d_torchscript`` (StyleGAN-V's TorchScript I3D, Kinetics-400
    logits) or ``torchscript`` (any scripted ``module(x) -> (B, D)`` on the same input)."""
    if kind not in I3D_KINDS:
        raise ValueError(f"unknown FVD extractor kind {kind!r}; expected one of {I3D_KINDS}")
    device = torch.device(device)
    p, module = _load_torchscript(path, f"FVD extractor ({kind}, e.g. i3d_torchscript.pt)", device)
    ext = Extractor(kind, p, file_sha256(p), module, device)
    probe_x = torch.zeros(1, 3, FVD_FRAMES, FVD_SIZE, FVD_SIZE, device=device)
    ext.dim = _probe(lambda: _i3d_features(ext, probe_x), p,
                     f"an FVD extractor ({kind}) on float clips (B, 3, T, H, W)")
    return ext


def _probe(features: Callable[[], Tensor], path: Path, what: str) -> int:
    """The feature width of a user's network on a probe input; a network that does not take that
    input (the Inception file given as --i3d, or the reverse) is a `UserError`."""
    try:
        return int(features().shape[1])
    except RuntimeError as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        raise UserError(f"{path.name} does not run as {what} ({lines[-1].strip() if lines else e}); "
                        "is it the right file?") from None


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> Extractor:
    """The FID feature network: StyleGAN2-ADA's TorchScript Inception (``inception-2015-12-05.pt``)."""
    device = torch.device(device)
    p, module = _load_torchscript(path, "FID Inception (e.g. inception-2015-12-05.pt)", device)
    ext = Extractor("inception_torchscript", p, file_sha256(p), module, device)
    frames = torch.zeros(1, 3, 64, 64, dtype=torch.uint8, device=device)
    ext.dim = _probe(lambda: _inception_features(ext, frames), p, "the FID Inception on uint8 frames (N, 3, H, W)")
    return ext


@torch.no_grad()
def _i3d_features(ext: Extractor, x: Tensor) -> Tensor:
    out = ext.module(x, rescale=False, resize=False, return_features=True) if ext.kind == "i3d_torchscript" \
        else ext.module(x)
    if out.ndim != 2 or out.shape[0] != x.shape[0]:
        raise ValueError(f"{ext.path.name} returned {tuple(out.shape)} for {x.shape[0]} clips; expected (B, D)")
    return out.double().cpu()


@torch.no_grad()
def _inception_features(ext: Extractor, frames: Tensor) -> Tensor:
    out = ext.module(frames, return_features=True)
    if out.ndim != 2 or out.shape[0] != frames.shape[0]:
        raise ValueError(f"{ext.path.name} returned {tuple(out.shape)} for {frames.shape[0]} frames; expected (N, D)")
    return out.double().cpu()


def to_uint8_range(videos: Tensor) -> Tensor:
    """``[-1, 1]`` -> float values in {0, ..., 255} (what a saved video holds)."""
    return ((videos.float().clamp(-1, 1) + 1) * 127.5).round()


def fvd_preprocess(videos: Tensor, frames: int = FVD_FRAMES, size: int = FVD_SIZE) -> Tensor:
    """``(B, 3, T, H, W)`` in [-1, 1] -> ``(B, 3, frames, size, size)`` in [-1, 1]: the first
    ``frames`` frames, quantised to [0, 255], each resized bilinearly (no crop, no antialias),
    mapped back to [-1, 1] as the reference FVD does."""
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"expected (B, 3, T, H, W) videos, got {tuple(videos.shape)}")
    if videos.shape[2] < frames:
        raise ValueError(f"FVD uses {frames} frames; the clips have {videos.shape[2]} (use longer clips or "
                         "--fvd-frames, and report it)")
    x = to_uint8_range(videos[:, :, :frames])
    B = x.shape[0]
    x = rearrange(x, "b c t h w -> (b t) c h w")
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # (B*T, 3, size, size)
    x = rearrange(x, "(b t) c h w -> b c t h w", b=B)
    return x / 127.5 - 1.0


def small_sample_warning(n_real: int, n_fake: int, protocol_n: int, unit: str) -> str | None:
    """A Fréchet distance measured on fewer than the protocol's ``protocol_n`` samples a side is
    biased upward (two samples of one distribution are already apart, by about d(d+1)/2N): the line
    a result carries, or None at the protocol's size."""
    n = min(n_real, n_fake)
    if n >= protocol_n:
        return None
    return (f"measured on {n_real} reference and {n_fake} generated {unit}, fewer than the usual {protocol_n}: "
            "Fréchet distances are biased upward at small N; compare it only with values at the same N, not with "
            f"published {protocol_n}-{unit[:-1]} numbers")


class FrechetAccumulator:
    """Streaming features of two sets (``real`` / ``fake``) for one extractor; ``protocol_n``
    samples (``unit``) a side is the protocol's size, below which a result carries a warning.
    With ``split_half`` (one feature row per sample, as FVD's clips) the real rows are also kept in
    two halves, alternately, for the distance between them: the noise floor at this N."""

    def __init__(self, ext: Extractor, features: Callable[[Tensor], Tensor], protocol: dict[str, Any],
                 protocol_n: int, unit: str, split_half: bool = False):
        self.ext, self.features, self.protocol = ext, features, protocol
        self.protocol_n, self.unit = protocol_n, unit
        self.stats = {"real": RunningGaussian(ext.dim), "fake": RunningGaussian(ext.dim)}
        if split_half:
            self.stats |= {"real_half0": RunningGaussian(ext.dim), "real_half1": RunningGaussian(ext.dim)}

    def update(self, which: str, batch: Tensor, index: Sequence[int] | None = None) -> None:
        """Add the features of ``batch``; ``index``: each clip's number in the whole set, whose parity
        picks its reference half (the same halves on any number of ranks), by default its row among
        all the real rows so far."""
        f = self.features(batch)
        if which == "real" and "real_half0" in self.stats:  # clip g goes to half g % 2
            first = self.stats["real"].n
            g = torch.arange(first, first + len(f)) if index is None else torch.as_tensor(list(index))
            self.stats["real_half0"].update(f[g % 2 == 0])
            self.stats["real_half1"].update(f[g % 2 == 1])
        self.stats[which].update(f)

    def state(self) -> dict[str, Tensor]:
        """The sums of every side (`RunningGaussian.state`), to send to another rank."""
        return {k: v for side, g in self.stats.items() for k, v in g.state(side).items()}

    def merge_states(self, states: Sequence[dict[str, Tensor]]) -> None:
        """Replace the statistics by the merge of ``states`` (`state` of accumulators of this
        extractor that saw disjoint clips, e.g. one per rank): as if one had seen them all."""
        for side in self.stats:
            merged = RunningGaussian(self.ext.dim)
            for state in states:
                part = RunningGaussian(self.ext.dim)
                part.load(state, side)
                merged.merge(part)
            self.stats[side] = merged

    def describe(self) -> dict[str, Any]:
        """The extractor (file name, sha256, width) and the protocol: what the features depend on."""
        return {**self.ext.describe(), **self.protocol}

    def result(self, name: str) -> dict[str, Any]:
        (m1, s1), (m2, s2) = self.stats["real"].stats(), self.stats["fake"].stats()
        n_real, n_fake = self.stats["real"].n, self.stats["fake"].n
        out = {name: frechet_distance(m1, s1, m2, s2), **self.ext.describe(), "n_real": n_real, "n_fake": n_fake,
               "protocol_n": self.protocol_n, "covariance": "unbiased (N - 1), float64", **self.protocol}
        warning = small_sample_warning(n_real, n_fake, self.protocol_n, self.unit)
        halves = [self.stats[k] for k in ("real_half0", "real_half1") if k in self.stats]
        if halves and min(h.n for h in halves) >= 2:
            (h1, c1), (h2, c2) = halves[0].stats(), halves[1].stats()
            out["reference_split_half"] = {
                name: frechet_distance(h1, c1, h2, c2), "n": [h.n for h in halves],
                "meaning": f"{name} between two halves of the reference {self.unit}: what two samples of one "
                           f"distribution score at {halves[0].n} a side (the bias falls about as 1/N: about twice "
                           f"the floor at {n_real}); a value near it cannot be told from the reference at this N"}
        return out | ({"small_sample": warning} if warning else {})


def fvd_accumulator(ext: Extractor, frames: int = FVD_FRAMES, batch: int = 8) -> FrechetAccumulator:
    def feats(videos: Tensor) -> Tensor:
        out = [_i3d_features(ext, fvd_preprocess(videos[i:i + batch], frames).to(ext.device))
               for i in range(0, len(videos), batch)]
        return torch.cat(out)
    return FrechetAccumulator(ext, feats, {"frames": frames, "resize": f"bilinear {FVD_SIZE}x{FVD_SIZE}, no crop",
                                            "range": "[-1, 1]"}, FVD_PROTOCOL_N, "clips", split_half=True)


def fid_accumulator(ext: Extractor, batch: int = 64) -> FrechetAccumulator:
    def feats(videos: Tensor) -> Tensor:
        frames = rearrange(to_uint8_range(videos), "b c t h w -> (b t) c h w").to(torch.uint8)
        return torch.cat([_inception_features(ext, frames[i:i + batch].to(ext.device))
                          for i in range(0, len(frames), batch)])
    return FrechetAccumulator(ext, feats, {"frames": "all frames of every clip",
                                            "input": "uint8 frames, resized inside the network"}, FID_PROTOCOL_N,
                              "frames")


# --------------------------------------------------------------------------------------------
# VBench: score aggregation and temporal flickering
# --------------------------------------------------------------------------------------------
# VBench (Huang et al. 2024), scripts/constant.py: per-dimension normalisation, dimension weights and
# the Quality / Semantic split; Total = (4 Quality + 1 Semantic) / 5.
VBENCH_NORMALIZE = {
    "subject_consistency": (0.1462, 1.0), "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0), "motion_smoothness": (0.706, 0.9975), "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0), "imaging_quality": (0.0, 1.0), "object_class": (0.0, 1.0),
    "multiple_objects": (0.0, 1.0), "human_action": (0.0, 1.0), "color": (0.0, 1.0),
    "spatial_relationship": (0.0, 1.0), "scene": (0.0, 0.8222), "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364), "overall_consistency": (0.0, 0.364),
}
VBENCH_WEIGHT = {d: (0.5 if d == "dynamic_degree" else 1.0) for d in VBENCH_NORMALIZE}
VBENCH_QUALITY = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
                  "aesthetic_quality", "imaging_quality", "dynamic_degree")
VBENCH_SEMANTIC = ("object_class", "multiple_objects", "human_action", "color", "spatial_relationship", "scene",
                   "appearance_style", "temporal_style", "overall_consistency")
VBENCH_QUALITY_WEIGHT, VBENCH_SEMANTIC_WEIGHT = 4.0, 1.0


def vbench_aggregate(scores: dict[str, float]) -> dict[str, Any]:
    """VBench's Quality, Semantic and Total scores from raw per-dimension scores (keys with ``_``
    or spaces). Each dimension is min-max normalised with VBench's table and weighted (dynamic
    degree 0.5); a group's score is the weighted mean over its dimensions, ``None`` with the
    missing dimensions listed when any is absent."""
    raw = {k.replace(" ", "_"): float(v) for k, v in scores.items()}
    unknown = sorted(set(raw) - set(VBENCH_NORMALIZE))
    if unknown:
        raise ValueError(f"unknown VBench dimension(s) {unknown}; known: {sorted(VBENCH_NORMALIZE)}")
    norm = {d: (v - VBENCH_NORMALIZE[d][0]) / (VBENCH_NORMALIZE[d][1] - VBENCH_NORMALIZE[d][0]) * VBENCH_WEIGHT[d]
            for d, v in raw.items()}

    def group(dims: tuple[str, ...]) -> tuple[float | None, list[str]]:
        missing = [d for d in dims if d not in norm]
        if missing:
            return None, missing
        return sum(norm[d] for d in dims) / sum(VBENCH_WEIGHT[d] for d in dims), []

    quality, miss_q = group(VBENCH_QUALITY)
    semantic, miss_s = group(VBENCH_SEMANTIC)
    total = None
    if quality is not None and semantic is not None:
        total = (VBENCH_QUALITY_WEIGHT * quality + VBENCH_SEMANTIC_WEIGHT * semantic) / (
            VBENCH_QUALITY_WEIGHT + VBENCH_SEMANTIC_WEIGHT)
    return {"raw": raw, "normalized": norm, "quality": quality, "semantic": semantic, "total": total,
            "missing": miss_q + miss_s}


def temporal_flickering(video: Tensor | np.ndarray) -> float:
    """VBench's temporal flickering of one clip: ``(255 - mean_t MAE(frame_t, frame_t+1)) / 255`` on
    [0, 255] frames (higher = steadier). ``video``: uint8 ``(T, H, W, 3)`` or float ``(3, T, H, W)``
    in [-1, 1]."""
    if isinstance(video, Tensor):
        x = video.detach().cpu()
        x = to_uint8_range(x).permute(1, 2, 3, 0).numpy() if x.is_floating_point() else x.numpy()
    else:
        x = np.asarray(video)
    x = x.astype(np.float64)
    if x.ndim != 4 or x.shape[0] < 2:
        raise ValueError(f"temporal flickering needs >= 2 frames (T, H, W, C), got shape {x.shape}")
    mae = np.abs(np.diff(x, axis=0)).reshape(x.shape[0] - 1, -1).mean(1)  # (T-1,)
    return float((255.0 - mae.mean()) / 255.0)
