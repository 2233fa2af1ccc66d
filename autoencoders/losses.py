"""Autoencoder training losses: reconstruction, KL, LPIPS and a PatchGAN with hinge loss.

The generator objective (what ``ldm train-ae`` minimises for the autoencoder) is

    L = L_rec + w_kl * L_KL + w_lpips * L_LPIPS + w_dwt * L_DWT + w_gan * lambda * L_G + sum(AEOutput.losses)

with the discriminator trained on the hinge loss ``L_D`` once ``step >= disc_start`` (Esser et al.,
"Taming Transformers", Eq. 4-7; the SD-VAE recipe of Rombach et al. 2022, Appendix G).

Normalisation (documented once, used everywhere):

- ``L_rec`` is the MEAN over all elements of ``|x - x_hat|`` (l1) or ``(x - x_hat)^2`` (l2).
- ``L_KL`` is the KL divergence of the diagonal Gaussian posterior ``N(mu, exp(logvar))`` from
  ``N(0, I)``, SUMMED over the latent elements of every part that has a log-variance, DIVIDED by
  the number of input elements (C*T*H*W) and averaged over the batch. Because ``L_rec`` is a
  per-element mean, the weight ``w_kl`` therefore means what it means in the SD-VAE / taming code
  (sum of rec over pixels + w * sum of KL over latents, both per sample): 1e-6 is the usual value.
- ``L_LPIPS`` is the mean LPIPS distance over frames (frames folded into the batch).
- ``L_DWT`` is the mean over all coefficients of ``|DWT(x) - DWT(x_hat)|``, DWT one level of the
  orthonormal 3D Haar transform over (T, H, W) (`haar_dwt3d`, 8 sub-bands). The DWT loss of H3AE's
  Tab. 5 (after WF-VAE and LTX-Video); H3AE gives neither its transform nor its weight, so the
  transform and level are our choice (alternative: a 2D per-frame DWT, several levels, or the
  high-frequency sub-bands only).
- ``lambda`` is the adaptive weight ``||grad_GL(L_rec + L_LPIPS)|| / (||grad_GL(L_G)|| + 1e-4)``
  clipped to [0, 1e4], where ``GL`` is the last decoder layer's weight (taming Eq. 7).

The discriminator is a PatchGAN (Isola et al., "pix2pix", Sec. 3.2.2): a stack of stride-2 4x4
convolutions scoring overlapping patches. ``"2d"`` scores every frame separately (frames folded
into the batch); ``"3d"`` uses (3, 4, 4) kernels over time too. GroupNorm replaces the original
BatchNorm so real and fake batches are normalised independently and DDP needs no SyncBN.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from autoencoders.base import AEOutput
from autoencoders.blocks import latent_kl
from ldm.latent import Latent
from ldm.metrics import LPIPS

REC_LOSSES = ("l1", "l2")
DISC_KINDS = ("2d", "3d")


@dataclass(frozen=True)
class AELossConfig:
    rec: str = "l1"  # "l1" | "l2"
    kl_weight: float = 1e-6
    lpips_weight: float = 0.0  # needs an LPIPS network given to AELoss
    dwt_weight: float = 0.0  # L1 between 3D Haar wavelet coefficients (H3AE Tab. 5's DWT loss); 0 = off
    gan_weight: float = 0.0  # 0 disables the discriminator
    disc_kind: str = "2d"  # "2d" per frame | "3d" spatio-temporal
    disc_start: int = 0  # optimizer step at which the GAN terms switch on
    disc_channels: int = 64
    disc_layers: int = 3
    adaptive_weight: bool = True  # taming's lambda; False uses gan_weight alone

    def __post_init__(self) -> None:
        if self.rec not in REC_LOSSES:
            raise ValueError(f"rec must be one of {REC_LOSSES}, got {self.rec!r}")
        if self.disc_kind not in DISC_KINDS:
            raise ValueError(f"disc_kind must be one of {DISC_KINDS}, got {self.disc_kind!r}")
        for name in ("kl_weight", "lpips_weight", "dwt_weight", "gan_weight"):
            if getattr(self, name) < 0 or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite value >= 0, got {getattr(self, name)}")
        if self.disc_start < 0:
            raise ValueError(f"disc_start must be >= 0, got {self.disc_start}")
        if self.disc_channels < 1 or self.disc_layers < 1:
            raise ValueError(f"disc_channels and disc_layers must be >= 1, "
                             f"got {self.disc_channels}, {self.disc_layers}")

    @property
    def gan(self) -> bool:
        return self.gan_weight > 0


def reconstruction_loss(x: Tensor, x_hat: Tensor, kind: str = "l1") -> Tensor:
    """Mean over all elements of the l1 or l2 error."""
    if x.shape != x_hat.shape:
        raise ValueError(f"reconstruction shape {tuple(x_hat.shape)} != input shape {tuple(x.shape)}")
    if kind == "l1":
        return (x - x_hat).abs().mean()
    if kind == "l2":
        return (x - x_hat).pow(2).mean()
    raise ValueError(f"rec must be one of {REC_LOSSES}, got {kind!r}")


def haar_dwt3d(video: Tensor) -> Tensor:
    """One level of the orthonormal Haar transform over (T, H, W) of ``B C T H W``: ``B C 8 T' H' W'``
    with ``T' = ceil(T / 2)`` etc. (an odd size is padded by repeating its last frame / row /
    column), sub-band 0 the low-pass of all three axes."""
    pad = [0, video.shape[4] % 2, 0, video.shape[3] % 2, 0, video.shape[2] % 2]
    if any(pad):
        video = F.pad(video, pad, mode="replicate")
    bands = video[:, :, None]  # (B, C, 1, T, H, W)
    for dim in (3, 4, 5):
        x = bands.movedim(dim, -1)
        even, odd = x[..., 0::2], x[..., 1::2]
        bands = (torch.cat([even + odd, even - odd], 2) / math.sqrt(2)).movedim(-1, dim)
    return bands


def dwt_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean over all coefficients of ``|haar_dwt3d(x) - haar_dwt3d(x_hat)|``."""
    if x.shape != x_hat.shape:
        raise ValueError(f"reconstruction shape {tuple(x_hat.shape)} != input shape {tuple(x.shape)}")
    return (haar_dwt3d(x) - haar_dwt3d(x_hat)).abs().mean()


def kl_loss(posterior: Latent, input_elements: int) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) = 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2) (Kingma & Welling,
    Appendix B), summed over the latent elements of every part with a log-variance, divided by
    ``input_elements`` (C*T*H*W per sample) and averaged over the batch. Zero when no part has one;
    zero-padded varlen frames (mu = 0, logvar = 0) contribute exactly 0."""
    if input_elements < 1:
        raise ValueError(f"input_elements must be >= 1, got {input_elements}")
    return (latent_kl(posterior) / input_elements).mean()


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class PatchDiscriminator(nn.Module):
    """PatchGAN over frames (``kind="2d"``) or clips (``kind="3d"``); input ``B C T H W`` in
    [-1, 1], output patch logits (``(B T) 1 h w`` or ``B 1 T h w``)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3, kind: str = "2d"):
        super().__init__()
        if kind not in DISC_KINDS:
            raise ValueError(f"kind must be one of {DISC_KINDS}, got {kind!r}")
        self.kind = kind
        conv = nn.Conv2d if kind == "2d" else nn.Conv3d
        k, p = (4, 1) if kind == "2d" else ((3, 4, 4), 1)

        def stride(s: int) -> int | tuple[int, int, int]:
            return s if kind == "2d" else (1, s, s)

        blocks: list[nn.Module] = [conv(in_channels, channels, k, stride(2), p), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers + 1):
            out = channels * min(2 ** i, 8)
            blocks += [conv(ch, out, k, stride(2 if i < layers else 1), p, bias=False),
                       nn.GroupNorm(_groups(out), out), nn.LeakyReLU(0.2)]
            ch = out
        blocks.append(conv(ch, 1, k, stride(1), p))
        self.net = nn.Sequential(*blocks)
        for m in self.modules():  # pix2pix initialisation: N(0, 0.02) convs, N(1, 0.02) norms
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, video: Tensor) -> Tensor:
        if video.ndim != 5:
            raise ValueError(f"discriminator expects B C T H W, got {tuple(video.shape)}")
        if self.kind == "2d":
            video = rearrange(video, "b c t h w -> (b t) c h w")  # frames folded into the batch
        return self.net(video)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(nll: Tensor, g_loss: Tensor, last_layer: Tensor | Sequence[Tensor],
                        max_weight: float = 1e4) -> Tensor:
    """taming Eq. 7: ||grad_GL nll|| / (||grad_GL g_loss|| + 1e-4), clipped and detached. ``last_layer``
    may be several weights that together write the output (IV-VAE's key and motion heads): the
    norms are over all of them, and a weight this clip did not reach counts as a zero gradient."""
    layers = [last_layer] if isinstance(last_layer, Tensor) else list(last_layer)

    def grad_norm(loss: Tensor) -> Tensor:
        grads = torch.autograd.grad(loss, layers, retain_graph=True, allow_unused=True)
        return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads if g is not None] or [loss.new_zeros(())]))

    weight = grad_norm(nll) / (grad_norm(g_loss) + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily stop gradients into ``module``'s parameters (they still flow to its input)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


class AELoss(nn.Module):
    """Generator and discriminator objectives for autoencoder training.

    ``lpips``: an ``ldm.metrics.LPIPS`` network built from user-given weight files
    (``LPIPS.from_files``); required when ``lpips_weight > 0``. It stays frozen.
    """

    def __init__(self, config: AELossConfig, in_channels: int = 3, lpips: LPIPS | None = None):
        super().__init__()
        self.config = config
        if config.lpips_weight > 0 and lpips is None:
            raise ValueError("lpips_weight > 0 needs an LPIPS network (give its weight files)")
        self.lpips = lpips.eval().requires_grad_(False) if lpips is not None and config.lpips_weight > 0 else None
        self.discriminator = (PatchDiscriminator(in_channels, config.disc_channels, config.disc_layers,
                                                 config.disc_kind) if config.gan else None)

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.config.disc_start

    def perceptual(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """Mean LPIPS over frames: ``B C T H W`` folded to ``(B T) C H W``."""
        a = rearrange(x, "b c t h w -> (b t) c h w")  # (B*T, C, H, W)
        b = rearrange(x_hat, "b c t h w -> (b t) c h w")  # (B*T, C, H, W)
        return self.lpips.distance(b, a).mean()  # differentiable (forward is the no-grad metric)

    def generator_loss(self, video: Tensor, out: AEOutput, step: int, last_layer: Tensor | None = None,
                       recon_trained: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """Total autoencoder loss and its detached terms. ``last_layer`` is needed only for the
        adaptive GAN weight once the GAN is active. Family terms in ``out.losses`` (already
        weighted) are added to the total and logged under their own names. ``recon_trained=False``
        (``Autoencoder.recon_trained``: ``out.recon`` is a detached estimate) logs ``rec``,
        ``lpips`` and ``dwt`` without adding them to the total, which is then the family's own objective."""
        cfg = self.config
        rec = reconstruction_loss(video, out.recon, cfg.rec)
        kl = kl_loss(out.posterior, video[0].numel())
        nll = rec
        logs: dict[str, Tensor] = {"rec": rec.detach(), "kl": kl.detach()}
        if self.lpips is not None:
            p = self.perceptual(video, out.recon)
            nll = nll + cfg.lpips_weight * p
            logs["lpips"] = p.detach()
        if cfg.dwt_weight > 0:
            d = dwt_loss(video, out.recon)
            nll = nll + cfg.dwt_weight * d
            logs["dwt"] = d.detach()
        if not recon_trained:
            if self.discriminator is not None:
                raise ValueError("the GAN needs a reconstruction that carries gradients (recon_trained)")
            nll = rec.new_zeros(())
        total = nll + cfg.kl_weight * kl
        if self.gan_active(step):
            with _frozen(self.discriminator):
                g_loss = -self.discriminator(out.recon).mean()
            if cfg.adaptive_weight:
                if last_layer is None:
                    raise ValueError("the adaptive GAN weight needs the decoder's last layer")
                weight = adaptive_gan_weight(nll, g_loss, last_layer) * cfg.gan_weight
            else:
                weight = torch.tensor(cfg.gan_weight, device=video.device)
            total = total + weight * g_loss
            logs["g_adv"] = g_loss.detach()
            logs["gan_weight"] = weight.detach()
        for name, term in out.losses.items():
            if name in logs or name in ("loss", "d_loss"):
                raise ValueError(f"family loss term {name!r} clashes with a built-in term name")
            total = total + term
            logs[name] = term.detach()
        logs["loss"] = total.detach()
        return total, logs

    def discriminator_loss(self, video: Tensor, recon: Tensor,
                           disc: nn.Module | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Hinge loss on real clips vs detached reconstructions. ``disc`` lets the trainer pass a
        DistributedDataParallel wrapper of ``self.discriminator``."""
        if self.discriminator is None:
            raise ValueError("discriminator_loss called with gan_weight == 0")
        disc = disc if disc is not None else self.discriminator
        # one forward over real and fake (GroupNorm is per sample, so this equals two passes) keeps
        # DDP at one forward per backward
        logits = disc(torch.cat([video, recon.detach()]))  # (2B or 2B*T, 1, ...)
        logits_real, logits_fake = logits.chunk(2)
        loss = hinge_d_loss(logits_real, logits_fake)
        return loss, {"d_loss": loss.detach(), "logits_real": logits_real.detach().mean(),
                      "logits_fake": logits_fake.detach().mean()}
