"""Official IV-VAE checkpoints -> ``ivvae`` models (source ``ivvae-official``).

The public code (ali-vilab/iv-vae, MIT; read for names, shapes and semantics, nothing copied)
releases ``ivvae_z4_dim64.pth``, ``ivvae_z8_dim64.pth``, ``ivvae_z16_dim64.pth`` and
``ivvae_z16_dim96.pth``: plain state dicts of its ``VAutoencoder3d``. They hold our registered
``ivvae-z4``, ``ivvae-z8``, ``ivvae-z16`` and ``ivvae-z16-dim96`` exactly (same parameter count, same
forward: GCConv grouping, keyframe resamplers, ZeroPad2d((0, 1, 0, 1)) before each stride-2 conv,
RMS norms as ``F.normalize * sqrt(C)``). What differs is only the naming:

- a KTC convolution is ``conv_2d`` (key half) + ``conv_3d`` (motion half) there (``Sep_Conv3d``),
  ours ``key`` + ``motion``; once time is fully compressed their ``Sep_Conv2d`` is ONE convolution
  writing both halves, ours two (its output rows are split); their 1x1x1 quant convs are 3D, ours 2D;
- residual blocks and attention blocks are entries of one ``nn.Sequential`` per side
  (``encoder.downsamples.N`` / ``decoder.upsamples.N``), in the order the forward runs them;
- the TMPE fuse layer reads its branches as ``[key halves of all branches | motion halves]``,
  ours as ``[branch 1 (key, motion) | branch 2 ...]``: its input columns are permuted.

The latent scale/shift the public code applies (``scale * (z - shift)``) belong to these weights;
the converter writes them into the model config (`OFFICIAL_STATS`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from autoencoders.base import REGISTRY
from autoencoders.ivvae import IVVAE, IVVAEConfig
from autoencoders.ivvae_layers import BranchAttention, BranchNorm, KTCConv, KTCResBlock
from autoencoders.sources import Conversion, KeyMap, ParamMapper, register_source, registered_target
from ldm import config as cfglib
from ldm.checkpoint import read_state_dict
from ldm.errors import UserError

# (latent_scale, latent_shift) of the released weights (the public code's IV_VAE factory)
OFFICIAL_STATS = {"ivvae-z4": (1.3196, 0.1250), "ivvae-z8": (1.0940, -0.0322), "ivvae-z16": (0.9697, -0.1553),
                  "ivvae-z16-dim96": (0.7619, -0.0483)}
OFFICIAL_DILATIONS = (1, 3, 6, 9, 12)


def check_official_layout(cfg: IVVAEConfig) -> None:
    """The public code's layout: four levels, time compressed at the two deepest boundaries, RMS
    norms, shrinking upsamplers, the TMPE head and attention, GCConvs and 2D key branches (no ablation
    variant: the same shapes would load, with another forward)."""
    need = dict(temporal_down=(False, True, True), norm="rms", upsample_shrink=True,
                pac_dilations=OFFICIAL_DILATIONS, tmpe_attention=True, in_channels=3, temporal_padding="group",
                key_branch="2d")
    wrong = {k: getattr(cfg, k) for k, v in need.items() if getattr(cfg, k) != v}
    if len(cfg.channel_mult) != 4:
        wrong["channel_mult"] = cfg.channel_mult
    if wrong:
        raise UserError(f"the official IV-VAE layout needs {need} and four levels; this config has {wrong} "
                        "(the released weights are ivvae-z4/z8/z16/z16-dim96: pass one of those or --target ivvae)")


class _Mapper(ParamMapper):
    """Fills an IV-VAE's parameters from official names (see the module docstring for the layout)."""

    def conv(self, ours: nn.Module, theirs: str, rows: slice | None = None, squeeze_time: bool = False) -> None:
        w, b = self.km.take(f"{theirs}.weight"), self.km.take(f"{theirs}.bias")
        if rows is not None:
            w, b = (t[rows] if t.numel() else t for t in (w, b))
        if squeeze_time and w.numel():
            w = w[:, :, 0]  # a 1x1x1 3D kernel as our 1x1 2D one
        self.param(ours.weight, w)
        self.param(ours.bias, b)

    def ktc(self, ours: KTCConv, theirs: str, joint: bool) -> None:
        """``joint``: their ``Sep_Conv2d`` (one conv writing both halves); else ``conv_2d`` + ``conv_3d``."""
        half = ours.key.out_channels
        if joint:
            self.conv(ours.key, f"{theirs}.conv", rows=slice(0, half))
            self.conv(ours.motion, f"{theirs}.conv", rows=slice(half, 2 * half))
        else:
            self.conv(ours.key, f"{theirs}.conv_2d")
            self.conv(ours.motion, f"{theirs}.conv_3d", squeeze_time=isinstance(ours.motion, nn.Conv2d))

    def gamma(self, ours: nn.Parameter, theirs: str) -> None:
        g = self.km.take(theirs)  # (C, 1, 1[, 1]) there, (C,) here
        self.param(ours, g.flatten() if g.numel() else g)

    def norm(self, ours: BranchNorm, theirs: str) -> None:
        self.gamma(ours.norm.weight, f"{theirs}.gamma")

    def res(self, ours: KTCResBlock, theirs: str, joint: bool) -> None:
        self.norm(ours.norm1, f"{theirs}.residual.0")
        self.ktc(ours.conv1, f"{theirs}.residual.2", joint)
        self.norm(ours.norm2, f"{theirs}.residual.3")
        self.ktc(ours.conv2, f"{theirs}.residual.6", joint)
        if ours.skip is not None:
            self.ktc(ours.skip, f"{theirs}.shortcut", joint)

    def attention(self, ours: BranchAttention, theirs: str) -> None:
        for half, name in ((ours.key, "Attention_2d"), (ours.motion, "Attention_3d")):
            self.gamma(half.norm.weight, f"{theirs}.{name}.norm.gamma")
            self.conv(half.qkv, f"{theirs}.{name}.to_qkv")
            self.conv(half.proj, f"{theirs}.{name}.proj")


def map_official(km: KeyMap, model: IVVAE) -> None:
    """Put every parameter of ``model`` from the official names in ``km`` (model in the official layout)."""
    cfg = model.config
    check_official_layout(cfg)
    m = _Mapper(km, model)
    enc, dec = model.encoder, model.decoder
    levels, deepest = len(cfg.channel_mult), len(cfg.channel_mult) - 1
    m.ktc(enc.conv_in, "encoder.conv1", joint=False)
    idx = 0
    for i in range(levels):  # encoder.downsamples: per level its blocks (+attention), its resampler
        for j in range(cfg.num_res_blocks):
            m.res(enc.blocks[i][j], f"encoder.downsamples.{idx}", joint=i == deepest)
            idx += 1
            if i == deepest:
                m.attention(enc.attentions[i][j], f"encoder.downsamples.{idx}")
                idx += 1
        if i < deepest:
            prefix = f"encoder.downsamples.{idx}"
            m.conv(enc.down_spatial[i].key.conv, f"{prefix}.resample_2d.1")
            m.conv(enc.down_spatial[i].motion.conv, f"{prefix}.resample_3d.1")
            if cfg.temporal_down[i]:
                m.conv(enc.down_temporal[i].conv, f"{prefix}.time_conv")
            idx += 1
        if i == deepest - 1:
            m.attention(enc.entry_attention, f"encoder.downsamples.{idx}")
            idx += 1
    for mid, side in ((enc.mid, "encoder"), (dec.mid, "decoder")):
        m.res(mid.res1, f"{side}.middle.0", joint=True)
        m.attention(mid.attn, f"{side}.middle.1")
        m.res(mid.res2, f"{side}.middle.2", joint=True)
    m.norm(enc.norm_out, "encoder.head.0")
    head = enc.head
    m.conv(head.point, "encoder.head.2.PAC_0.conv")
    for d, conv in zip(head.dilations, head.atrous):
        m.conv(conv, f"encoder.head.2.PAC_{d}.conv")
    fuse = km.take("encoder.head.2.PAC_conv.conv.weight")
    z, n = head.fuse.out_channels // 2, 1 + len(head.dilations)
    if fuse.ndim == 4 and fuse.shape[1] == 2 * z * n:  # theirs reads [key of each branch | motion of each
        # branch], ours branch by branch (any other shape is reported as a mismatch)
        order = torch.cat([torch.cat([torch.arange(b * z, (b + 1) * z), torch.arange((n + b) * z, (n + b + 1) * z)])
                           for b in range(n)])
        fuse = fuse[:, order]
    km.put("encoder.head.fuse.weight", fuse)
    km.put("encoder.head.fuse.bias", km.take("encoder.head.2.PAC_conv.conv.bias"))
    m.ktc(model.quant, "conv1", joint=False)
    m.ktc(model.post_quant, "conv2", joint=False)

    m.ktc(dec.conv_in, "decoder.conv1", joint=True)
    idx = 0
    for j in range(levels):  # decoder.upsamples, deepest level first
        for k in range(cfg.num_res_blocks + 1):
            m.res(dec.blocks[j][k], f"decoder.upsamples.{idx}", joint=j == 0)
            idx += 1
            if j == 0:
                m.attention(dec.attentions[j][k], f"decoder.upsamples.{idx}")
                idx += 1
        if j < levels - 1:
            prefix = f"decoder.upsamples.{idx}"
            if cfg.temporal_down[deepest - 1 - j]:
                m.conv(dec.up_temporal[j].conv, f"{prefix}.time_conv")
            m.conv(dec.up_spatial[j].key, f"{prefix}.resample_2d.1")
            m.conv(dec.up_spatial[j].motion, f"{prefix}.resample_3d.1")
            idx += 1
    m.norm(dec.norm_out, "decoder.head.0")
    m.ktc(dec.head, "decoder.head.2", joint=False)


@register_source("ivvae-official", family="ivvae",
                 reads="a released IV-VAE state dict (ivvae_z16_dim64.pth, ...: .pth/.pt or .safetensors)")
def convert_official(path: Path, target: str) -> Conversion:
    """An IV-VAE holding the official checkpoint ``path``; ``target`` a registered IV-VAE or
    ``ivvae`` (the registered one whose shapes the file has)."""
    state = read_state_dict(path)
    name = registered_target(state, target, IVVAE, map_official, f"ivvae-official {path}")
    config = REGISTRY[name][1]
    if name in OFFICIAL_STATS:
        scale, shift = OFFICIAL_STATS[name]
        config = cfglib.replace(config, latent_scale=(scale,), latent_shift=(shift,))
    model = IVVAE(config)
    km = KeyMap(state, f"{path} as {name}")
    map_official(km, model)
    km.load_into(model)
    notes = [f"{len(state)} official tensors -> {len(km.out)} of {name} ({model.num_parameters():,} parameters)"]
    if name in OFFICIAL_STATS:
        notes.append(f"latent scale/shift of the released weights: {OFFICIAL_STATS[name]}")
    return Conversion(model.eval(), name, notes)
