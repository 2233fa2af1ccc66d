"""Official VideoVAE+ checkpoints -> ``cmvae`` models (source ``videovaeplus-official``).

The public code (VideoVerses/VideoVAEPlus; code read for names, shapes and semantics, nothing
copied; the released weights are CC-BY-NC-ND, so users bring their own local copy) releases
``sota-4-4z.ckpt``, ``sota-4-4z-text.ckpt``, ``sota-4-16z.ckpt`` and ``sota-4-16z-text.ckpt``:
Lightning checkpoints of its ``AutoencoderKL2plus1D_1dcnn``. They hold our registered ``cmvae-z4``,
``cmvae-z4-text``, ``cmvae-z16`` and ``cmvae-z16-text`` (see ``crossmodal.py`` for the layout both
share). The naming differs:

- first stage: ``encoder.down.I.block.J`` / ``decoder.up.I.block.J`` (the decoder indexed by
  resolution level, 0 the finest) with ``conv1_tmp`` / ``conv2_tmp`` / ``conv3_tmp`` temporal convs,
  ``nin_shortcut``, text attention ``attn.J`` (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), the mid
  block's ``attn_1`` (separate 1x1x1 ``q``, ``k``, ``v``, ``proj_out``) and ``attn_1_tmp``;
  resamplers are (1, 3, 3) 3D convs where ours are 2D;
- second stage: ``encoder_temporal`` / ``decoder_temporal`` with ``mid_blocks.I`` (``down`` / ``up``,
  ``res`` / ``res1`` / ``res2``, ``attn`` / ``attn1`` / ``attn2``), ``final_block`` and ``conv_last``.

Dropped knowingly: ``loss.*`` (the training loss: LPIPS and discriminator) and ``conv3_tmp`` of every
residual block whose width does not change (the public forward never runs it).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from autoencoders.base import REGISTRY
from autoencoders.crossmodal import (CrossModalVAE, PatchCrossAttention, STResBlock, TemporalConv,
                                     TemporalResBlock, TemporalSelfAttention)
from autoencoders.sources import Conversion, KeyMap, ParamMapper, register_source, registered_target
from ldm.checkpoint import read_state_dict

UNUSED = "the public forward never runs conv3_tmp where a residual block keeps its width"
TRAINING = "training loss (LPIPS and discriminator)"


def check_official_layout(model: CrossModalVAE) -> None:
    cfg = model.config
    need = dict(temporal_layers=True, temporal_ae=True, temporal_kernel=(3, 3, 3), temporal_decoder_blocks=2,
                spatial_temporal_down=(False,) * (len(cfg.channel_mult) - 1))
    if cfg.text_dim:
        need["text_in_temporal_ae"] = True
    wrong = {k: getattr(cfg, k) for k, v in need.items() if getattr(cfg, k) != v}
    if wrong:
        raise ValueError(f"the official VideoVAE+ layout needs {need}; this config has {wrong}")


class _Mapper(ParamMapper):
    def conv(self, ours: nn.Module, theirs: str, squeeze_time: bool = False) -> None:
        w = self.km.take(f"{theirs}.weight")
        self.param(ours.weight, w[:, :, 0] if squeeze_time and w.numel() else w)  # (o, i, 1, k, k) -> (o, i, k, k)
        if getattr(ours, "bias", None) is not None:
            self.param(ours.bias, self.km.take(f"{theirs}.bias"))

    def temporal_conv(self, ours: TemporalConv, theirs: str) -> None:
        self.conv(ours.norm, f"{theirs}.norm")
        self.conv(ours.conv, f"{theirs}.conv")

    def res(self, ours: STResBlock, theirs: str) -> None:
        self.conv(ours.norm1, f"{theirs}.norm1")
        self.conv(ours.conv1, f"{theirs}.conv1")
        self.temporal_conv(ours.temporal1, f"{theirs}.conv1_tmp")
        self.conv(ours.norm2, f"{theirs}.norm2")
        self.conv(ours.conv2, f"{theirs}.conv2")
        self.temporal_conv(ours.temporal2, f"{theirs}.conv2_tmp")
        if ours.skip is not None:
            self.conv(ours.skip, f"{theirs}.nin_shortcut")
            self.temporal_conv(ours.temporal_skip, f"{theirs}.conv3_tmp")
        else:
            for part in ("norm.weight", "norm.bias", "conv.weight", "conv.bias"):
                self.km.drop(f"{theirs}.conv3_tmp.{part}", UNUSED)

    def spatial_attention(self, ours: nn.Module, theirs: str) -> None:
        self.conv(ours.norm, f"{theirs}.norm")
        w = [self.km.take(f"{theirs}.{k}.weight") for k in "qkv"]
        self.param(ours.qkv.weight, torch.cat([t.flatten(1) for t in w])[:, :, None, None] if all(t.numel() for t in w)
                   else w[0])
        self.param(ours.qkv.bias, torch.cat([self.km.take(f"{theirs}.{k}.bias") for k in "qkv"]))
        self.conv(ours.proj, f"{theirs}.proj_out", squeeze_time=True)

    def temporal_attention(self, ours: TemporalSelfAttention, theirs: str) -> None:
        self.conv(ours.norm, f"{theirs}.norm")
        self.conv(ours.qkv, f"{theirs}.qkv")
        self.param(ours.rel_k, self.km.take(f"{theirs}.relative_position_k.embeddings_table"))
        self.param(ours.rel_v, self.km.take(f"{theirs}.relative_position_v.embeddings_table"))
        self.conv(ours.proj, f"{theirs}.proj_out")

    def text(self, ours: PatchCrossAttention, theirs: str) -> None:
        self.conv(ours.norm, f"{theirs}.norm")
        self.conv(ours.attn.q, f"{theirs}.to_q")
        self.param(ours.attn.kv.weight, torch.cat([self.km.take(f"{theirs}.to_k.weight"),
                                                   self.km.take(f"{theirs}.to_v.weight")]))
        self.conv(ours.attn.proj, f"{theirs}.to_out.0")

    def temporal_res(self, ours: TemporalResBlock, theirs: str) -> None:
        for name in ("norm1", "norm2"):
            self.conv(getattr(ours, name), f"{theirs}.{name}")
        for name in ("conv1", "conv2"):
            self.conv(getattr(ours, name), f"{theirs}.{name}.conv")


def map_official(km: KeyMap, model: CrossModalVAE) -> None:
    """Put every parameter of ``model`` from the official names in ``km``."""
    check_official_layout(model)
    m, cfg = _Mapper(km, model), model.config
    levels = len(cfg.channel_mult)
    enc, dec = model.encoder, model.decoder
    m.conv(enc.conv_in, "encoder.conv_in")
    for i, level in enumerate(enc.levels):
        for j, block in enumerate(level.blocks):
            m.res(block, f"encoder.down.{i}.block.{j}")
        for j, text in enumerate(level.text):
            m.text(text, f"encoder.down.{i}.attn.{j}")
        if i < levels - 1:
            m.conv(level.resample.conv, f"encoder.down.{i}.downsample.conv", squeeze_time=True)
    for j, level in enumerate(dec.levels):  # ours deepest first, theirs by resolution level
        i = levels - 1 - j
        for k, block in enumerate(level.blocks):
            m.res(block, f"decoder.up.{i}.block.{k}")
        for k, text in enumerate(level.text):
            m.text(text, f"decoder.up.{i}.attn.{k}")
        if i > 0:
            m.conv(level.resample.conv, f"decoder.up.{i}.upsample.conv", squeeze_time=True)
    for side, mid in (("encoder", enc.mid), ("decoder", dec.mid)):
        m.res(mid.res1, f"{side}.mid.block_1")
        m.spatial_attention(mid.attn, f"{side}.mid.attn_1")
        m.temporal_attention(mid.temporal_attn, f"{side}.mid.attn_1_tmp")
        m.res(mid.res2, f"{side}.mid.block_2")
    for ours, theirs in ((enc.norm_out, "encoder.norm_out"), (enc.conv_out, "encoder.conv_out"),
                         (dec.conv_in, "decoder.conv_in"), (dec.norm_out, "decoder.norm_out"),
                         (dec.conv_out, "decoder.conv_out")):
        m.conv(ours, theirs)
    if cfg.quant_conv:
        m.conv(model.quant_conv, "quant_conv")
        m.conv(model.post_quant_conv, "post_quant_conv")
    tenc, tdec = model.temporal_ae.encoder, model.temporal_ae.decoder
    m.conv(tenc.conv_in, "encoder_temporal.conv_in.conv")
    for i, stage in enumerate(tenc.stages):
        m.conv(stage.resample, f"encoder_temporal.mid_blocks.{i}.down.conv")
        m.temporal_res(stage.blocks[0], f"encoder_temporal.mid_blocks.{i}.res")
        for text in stage.text:
            m.text(text, f"encoder_temporal.mid_blocks.{i}.attn.0")
    m.conv(tenc.norm_out, "encoder_temporal.final_block.0")
    m.conv(tenc.conv_out, "encoder_temporal.final_block.2.conv")
    m.conv(tdec.conv_in, "decoder_temporal.conv_in.conv")
    for i, stage in enumerate(tdec.stages):
        m.conv(stage.resample, f"decoder_temporal.mid_blocks.{i}.up")
        for k, block in enumerate(stage.blocks):
            m.temporal_res(block, f"decoder_temporal.mid_blocks.{i}.res{k + 1}")
        for k, text in enumerate(stage.text):
            m.text(text, f"decoder_temporal.mid_blocks.{i}.attn{k + 1}.0")
    m.conv(tdec.conv_out, "decoder_temporal.conv_last.conv")
    km.drop_prefix("loss.", TRAINING)


@register_source("videovaeplus-official", family="cmvae",
                 reads="a released VideoVAE+ checkpoint (sota-4-16z.ckpt, ...: .ckpt/.pt or .safetensors)")
def convert_official(path: Path, target: str) -> Conversion:
    """A cross-modal VAE holding the official checkpoint ``path``; ``target`` a registered cmvae
    or ``cmvae`` (the registered one whose shapes the file has)."""
    state = read_state_dict(path)
    target = registered_target(state, target, CrossModalVAE, map_official, f"videovaeplus-official {path}")
    model = CrossModalVAE(REGISTRY[target][1])
    if model.config.text_dim and not any(k.endswith(".to_q.weight") for k in state):
        plain = target.replace("-text", "")
        raise ValueError(f"{path} has no text layers (a model without text): convert it with --target {plain}, "
                         "then start the text model from that folder: ldm convert --source saved --path DIR "
                         f"--target {target}")
    km = KeyMap(state, f"{path} as {target}")
    map_official(km, model)
    km.load_into(model)
    notes = [f"{len(state)} official tensors -> {len(km.out)} of {target} ({model.num_parameters():,} parameters)"]
    if km.dropped:
        notes.append(km.dropped_summary())
    if model.config.text_dim:
        notes.append(f"text-guided: encode and decode take the caption embedding ({model.config.text_dim}-d with its mask; "
                     "the released models were trained with Flan-T5-large, 100 tokens)")
    return Conversion(model.eval(), target, notes)
