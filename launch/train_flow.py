"""One batch's rectified-flow loss in ``ldm train``: the per-sample random draws (posterior
sample, timestep, noise, condition dropout, each from a generator seeded by the sample's place in
the global data stream), the standardised latent and its condition, the loss (`flow_step_loss`:
where a weighting over timesteps goes) and the `StepInputs` the prefetch thread prepares
(`prepare_step`). The loop that calls them is `launch/train.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import dit
from data.manifest import Manifest
from launch.train_config import DataConfig, FlowConfig, TrainConfig
from ldm import flow
from ldm.latent import VARLEN_AXIS, Cond, Latent, normalize


def sample_generators(seed: int, positions: list[int]) -> list[torch.Generator]:
    """One generator per sample, seeded by the sample's place in the global data stream: a sample
    draws the same posterior noise, timestep, flow noise and dropout whatever rank or batch it is in,
    so runs on different topologies (and resumed runs) compute the same losses."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + int(p)) for p in positions]


def _per_sample(gens: list[torch.Generator], draw) -> torch.Tensor:
    return torch.stack([draw(g) for g in gens])


def per_sample_normal(gens: list[torch.Generator], like: torch.Tensor, lengths: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """N(0, 1) noise shaped like ``like`` ``(B, ...)``, sample i from ``gens[i]``. With ``lengths``
    (a varlen batch, parts padded along ``VARLEN_AXIS``) sample i is drawn at its own length and
    zero-padded, so its noise -- and every draw after it -- does not depend on the padded length,
    i.e. on which other samples share its batch (rank count, batch size)."""
    if lengths is None:
        return _per_sample(gens, lambda g: torch.randn(like.shape[1:], generator=g))
    out = torch.zeros(like.shape)
    for i, g in enumerate(gens):
        shape = list(like.shape[1:])
        shape[VARLEN_AXIS - 1] = int(lengths[i])
        out[i].narrow(VARLEN_AXIS - 1, 0, shape[VARLEN_AXIS - 1]).copy_(torch.randn(shape, generator=g))
    return out


def varlen_lengths(latent: Latent) -> torch.Tensor | None:
    """Each sample's length along ``VARLEN_AXIS`` in a varlen batch ``(B,)``; None for a grid."""
    return latent.aux["length"].cpu() if latent.form == "varlen" else None


def sample_posterior(latent: Latent, gens: list[torch.Generator]) -> Latent:
    """z ~ N(mean, exp(logvar)) for the parts with a posterior, with per-sample generators."""
    parts = dict(latent.parts)
    for k, lv in latent.logvar.items():
        eps = per_sample_normal(gens, lv, varlen_lengths(latent)).to(lv.device, lv.dtype)
        parts[k] = parts[k] + torch.exp(0.5 * lv) * eps
    return Latent(parts, latent.form, {}, dict(latent.aux))


def latent_norm_stats(dcfg: DataConfig, manifest: Manifest) -> dict[str, dict[str, list[float]]]:
    """Per-part, per-channel mean/std the trainer standardises with (and sampling undoes): the
    manifest's statistics, with the std of posterior samples when z is sampled from the posterior."""
    if not dcfg.normalize:
        return {}
    key = "sample_std" if dcfg.sample_posterior else "std"
    return {part: {"mean": st["mean"], "std": st.get(key, st["std"])} for part, st in manifest.stats.items()}


def batch_cond(batch: dict, dcfg: dit.DiTConfig) -> Cond:
    c = batch["cond"]
    class_id = c["class_id"] if dcfg.num_classes else None
    text = text_mask = None
    if dcfg.text_dim:
        if "text_emb" not in c:
            raise ValueError("the DiT is text-conditioned but the shards have no cached text embeddings "
                             "(extract with --text-encoder, or set model.text_cond=false)")
        text, text_mask = c["text_emb"], c["text_mask"]
        # a clip without a caption trains the null text, as shards made since cache it (no tokens); older ones
        # cached the empty caption's tokens
        text_mask = text_mask & torch.tensor([bool(cap) for cap in c["caption"]], device=text_mask.device)[:, None]
        text = text * text_mask[..., None]
    return Cond(text=text, text_mask=text_mask, class_id=class_id)


def batch_work(model, latent: Latent, context: int) -> torch.Tensor:
    """``(tokens, training FLOPs)`` of one batch through the DiT trunk (`VideoDiT.trunk_flops`: each
    block's attention over its own groups), counted per sample at its real size: a varlen sample at
    its own length, a bucket at its own shape (not the manifest's)."""
    lengths = varlen_lengths(latent)
    tokens = flops = 0.0
    for i in range(latent.batch_size):
        shape = {k: list(v.shape[1:]) for k, v in latent.parts.items()}
        if lengths is not None:
            for s in shape.values():
                s[VARLEN_AXIS - 1] = int(lengths[i])
        parts = {k: tuple(s) for k, s in shape.items()}
        tokens += model.num_tokens(parts)
        flops += 3 * model.trunk_flops(parts, context)
    return torch.tensor([tokens, flops], dtype=torch.float64)


def flow_draws(latent: Latent, fcfg: FlowConfig, gens: list[torch.Generator]
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Per-sample random draws of one flow step, in a fixed order from each sample's generator:
    timestep ``t (B,)``, noise per part (varlen samples at their own length), and ``u (B, 3)``
    (uniforms deciding condition / class / text dropout)."""
    device = next(iter(latent.parts.values())).device
    t = torch.cat([flow.sample_timesteps(1, distribution=fcfg.timesteps, loc=fcfg.loc, scale=fcfg.scale,
                                         shift=fcfg.shift, generator=g) for g in gens]).to(device)
    lengths = varlen_lengths(latent)
    noise = {k: per_sample_normal(gens, v, lengths).to(device, v.dtype) for k, v in latent.parts.items()}
    u = _per_sample(gens, lambda g: torch.rand(3, generator=g)).to(device)  # (B, 3)
    return t, noise, u


def flow_step_loss(model, latent: Latent, cond: Cond, fcfg: FlowConfig,
                   draws: tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor], null_cond,
                   pack: bool = False) -> torch.Tensor:
    """One rectified-flow loss on a batch (per-sample losses averaged). ``draws`` are the step's
    per-sample random draws ``(t, noise, u)`` from ``flow_draws``. ``null_cond(cond, drop)``
    replaces the condition of dropped samples (CFG training). ``pack``: the DiT runs the batch
    packed (``VideoDiT.forward(pack=True)``)."""
    t, noise, u = draws
    drop, drop_class, drop_text = u[:, 0] < fcfg.cond_dropout, u[:, 1] < fcfg.class_dropout, u[:, 2] < fcfg.text_dropout
    x_t = latent.replace(flow.interpolate(latent.parts, noise, t))
    cond = null_cond(cond, drop)
    if cond.class_id is not None and fcfg.class_dropout > 0:
        cond.class_id = torch.where(drop_class, -1, cond.class_id)
    if cond.text is not None and fcfg.text_dropout > 0:
        text_only = null_cond(Cond(text=cond.text, text_mask=cond.text_mask), drop_text)
        cond.text, cond.text_mask = text_only.text, text_only.text_mask
    v = model(x_t, t, cond, pack=True) if pack else model(x_t, t, cond)
    mask = None
    if latent.form == "varlen":
        valid = latent.padding_mask()
        mask = {k: flow.expand_mask(valid, p, 2) for k, p in latent.parts.items() if p.ndim == 5}
    per_sample = flow.flow_loss(v, flow.velocity_target(latent.parts, noise), mask)  # (B,): weight by t here
    return per_sample.mean()


@dataclass
class StepInputs:
    """One micro-batch made ready on the host: the latent (posterior-sampled, normalised), its
    condition, the flow draws ``(t, noise, u)`` and its ``(tokens, FLOPs)``; where its first clip is
    in the data stream (``(epoch, epoch_start)`` of its meta) and its clips per data.shards folder.
    Everything random here comes from the per-sample generators, so it can be prepared ahead in
    another thread."""

    latent: Latent
    cond: Cond
    draws: tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]
    work: torch.Tensor
    stream: tuple[int, int] = (0, 0)
    sources: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.float64))

    def pin_memory(self) -> "StepInputs":
        t, noise, u = self.draws
        pin = lambda x: None if x is None else x.pin_memory()  # noqa: E731
        return StepInputs(self.latent.pin_memory(), Cond(*(pin(x) for x in (self.cond.text, self.cond.text_mask,
                                                                             None, self.cond.class_id))),
                          (t.pin_memory(), {k: v.pin_memory() for k, v in noise.items()}, u.pin_memory()), self.work,
                          self.stream, self.sources)

    def to(self, device: torch.device) -> "StepInputs":
        """On ``device``; asynchronous from pinned memory."""
        move = lambda x: None if x is None else x.to(device, non_blocking=True)  # noqa: E731
        t, noise, u = self.draws
        return StepInputs(self.latent.to(device, non_blocking=True),
                          Cond(*(move(x) for x in (self.cond.text, self.cond.text_mask, None, self.cond.class_id))),
                          (move(t), {k: move(v) for k, v in noise.items()}, move(u)), self.work, self.stream,
                          self.sources)


def prepare_step(batch: dict, cfg: TrainConfig, dcfg: dit.DiTConfig, latent_norm: dict, model, context: int,
                 folders: int = 1) -> StepInputs:
    """A reader's batch -> ``StepInputs`` (host tensors): posterior sample, normalisation, flow
    draws, condition, work count, stream place, clips per folder (of ``folders``)."""
    meta = batch["meta"]
    gens = sample_generators(cfg.seed, [m["position"] for m in meta])
    latent = standardized(batch["latent"], cfg.data, latent_norm, gens)
    draws = flow_draws(latent, cfg.flow, gens)
    sources = torch.bincount(torch.tensor([m["source"] for m in meta]), minlength=folders).double()
    return StepInputs(latent, batch_cond(batch, dcfg), draws, batch_work(model, latent, context),
                      (meta[0]["epoch"], meta[0]["epoch_start"]), sources)


def standardized(latent: Latent, dcfg: DataConfig, latent_norm: dict, gens: list[torch.Generator]) -> Latent:
    """A batch's latent as the DiT sees it: a posterior sample (``data.sample_posterior``, drawn
    from the per-sample generators), standardised with the training statistics."""
    if dcfg.sample_posterior and latent.logvar:
        latent = sample_posterior(latent, gens)
    return normalize(latent, latent_norm)
