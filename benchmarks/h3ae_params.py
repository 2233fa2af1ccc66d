"""Analytic parameter counts of H3AE under readings of the paper's Tab. 9 / Fig. 2 / App. D.

    python benchmarks/h3ae_params.py [--top 15] [--check]

Tab. 9 lists per column a width and a block count; it leaves open, among others, the kernel and
the channel expansion of the PixelShuffle convolution, the kernel of the convolutions into and out
of the latent, whether the decoder has one extra block per column (SD-VAE style), and what one
"attention block" holds. Each reading is a set of options; the script counts the three paper
configs (Tab. 3: 67.16 / 196.51 / 643.76 M) and the Tab. 1 variants of 8x32x32 (3D spatial stage
189, interpolation upsampling 169, z=128 195, GN/LN 197, no attention 316 M) for every
combination, ranks the readings by their worst relative error on Tab. 3, and prints the best.
``--check`` builds the registered configs on the meta device and compares them with the analytic
count of the reading the code implements (they must agree exactly).
"""
from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass, replace

PAPER = {"4x16x16": 67.16e6, "8x32x32": 196.51e6, "8x64x64": 643.76e6}
TAB1 = {"3d": 189e6, "interp": 169e6, "z128": 195e6, "gn": 197e6, "noattn": 316e6}


def conv(cin: int, cout: int, k: int, dims: int, bias: bool = True) -> int:
    return k ** dims * cin * cout + (cout if bias else 0)


@dataclass(frozen=True)
class Arch:
    """One paper config as Tab. 9 gives it: per column (width, blocks, dims, temporal)."""

    spatial: tuple[tuple[int, int], ...]
    st: tuple[tuple[int, int], ...]
    attn: tuple[int, int] | None
    temporal: tuple[bool, ...]  # per ST column (+ attention column)
    z: int = 256


ARCHS = {
    "4x16x16": Arch(((32, 2), (64, 2)), ((128, 2), (256, 8)), None, (True, True)),
    "8x32x32": Arch(((32, 2), (64, 2)), ((128, 2), (256, 6)), (512, 8), (True, True, True)),
    "8x64x64": Arch(((32, 2), (64, 2)), ((128, 2), (256, 6), (512, 8)), (512, 8), (True, True, True, False)),
}


@dataclass(frozen=True)
class Reading:
    up_k: int = 3            # kernel of the PixelShuffle conv
    up_expand: str = "out"   # conv C_in -> C_out*r ("out") or C_in -> C_in*r, channels changed by the next block ("in")
    lat_enc_k: int = 3       # encoder conv to 2z moments
    lat_dec_k: int = 3       # decoder conv from z
    dec_extra: int = 0       # extra ResBlocks per decoder conv column (SD-VAE: N+1)
    attn_mlp: float = 4.0    # MLP ratio of an attention block (0: none)
    attn_extra: str = "none"  # what else one attention block holds: none | conv3d | resblock
    attn_dec_extra: int = 0  # extra attention blocks in the decoder's attention column
    down: str = "conv"       # strided conv into the new width ("conv") or keep width, first block changes ("keep")
    mid: int = 0             # SD-style mid ResBlocks at the bottleneck, per side
    # ablation switches (Tab. 1)
    spatial_3d: bool = False
    upsample: str = "shuffle"  # | "interp" (nearest + 3x3(x3) conv C_in -> C_out)
    no_attn: str = "none"      # replace attention blocks by: "resblock" | "conv3d" (when set)
    norm_affine: bool = False  # GN/LN: 2C per norm


def _resblock(cin: int, cout: int, dims: int, r: Reading) -> int:
    n = conv(cin, cout, 3, dims) + conv(cout, cout, 3, dims) + (conv(cin, cout, 1, dims) if cin != cout else 0)
    return n + (2 * (cin + cout) if r.norm_affine else 0)


def _attn_block(c: int, r: Reading) -> int:
    if r.no_attn == "resblock":
        return _resblock(c, c, 3, r)
    if r.no_attn == "conv3d":
        return conv(c, c, 3, 3)
    heads = 8
    n = conv(c, 3 * c, 1, 1) + conv(c, c, 1, 1) + 2 * (c // heads)  # qkv, proj, QK RMSNorm weights
    if r.attn_mlp:
        hidden = int(c * r.attn_mlp)
        n += conv(c, hidden, 1, 1) + conv(hidden, c, 1, 1)
    n += {"none": 0, "conv3d": conv(c, c, 3, 3), "resblock": _resblock(c, c, 3, r)}[r.attn_extra]
    return n + (4 * c if r.norm_affine else 0)


def count(arch: Arch, r: Reading) -> int:
    """Parameters of encoder + decoder under reading ``r``."""
    sd = 3 if r.spatial_3d else 2
    cols = [(w, n, sd, False, "conv") for w, n in arch.spatial]
    cols += [(w, n, 3, t, "conv") for (w, n), t in zip(arch.st, arch.temporal)]
    if arch.attn:
        cols.append((arch.attn[0], arch.attn[1], 3, arch.temporal[-1], "attn"))
    total = 0
    # encoder
    prev = cols[0][0]
    total += conv(3, prev, 3, sd)  # stem
    for w, n, dims, _, kind in cols:
        if r.down == "conv":
            total += conv(prev, w, 3, dims)
            cin = w
        else:
            total += conv(prev, prev, 3, dims)
            cin = prev
        if kind == "conv":
            for j in range(n):
                total += _resblock(cin if j == 0 else w, w, dims, r)
        else:
            if cin != w:
                total += conv(cin, w, 1, 3)
            total += n * _attn_block(w, r)
        prev = w
    total += r.mid * _resblock(prev, prev, 3, r)
    total += conv(prev, 2 * arch.z, r.lat_enc_k, 3)
    # decoder
    total += conv(arch.z, prev, r.lat_dec_k, 3)
    total += r.mid * _resblock(prev, prev, 3, r)
    carry = prev  # channels entering the column
    for i in reversed(range(len(cols))):
        w, n, dims, temporal, kind = cols[i]
        target = cols[i - 1][0] if i > 0 else w
        if kind == "conv":
            for j in range(n + r.dec_extra):
                total += _resblock(carry if j == 0 else w, w, dims, r)
        else:
            if carry != w:
                total += conv(carry, w, 1, 3)
            total += (n + r.attn_dec_extra) * _attn_block(w, r)
        factor = (2 if temporal else 1) * 4
        if r.upsample == "interp":
            total += conv(w, target, 3, dims)
            carry = target
        elif r.up_expand == "out":
            total += conv(w, target * factor, r.up_k, dims)
            carry = target
        else:
            total += conv(w, w * factor, r.up_k, dims)
            carry = w
    if carry != cols[0][0]:
        total += conv(carry, cols[0][0], 1, sd)
    total += conv(cols[0][0], 3, 3, sd)
    if r.norm_affine:  # the encoder's and decoder's output norms
        total += 2 * (prev + cols[0][0])
    return total


def evaluate(r: Reading) -> dict[str, float]:
    out = {name: count(arch, r) for name, arch in ARCHS.items()}
    a = ARCHS["8x32x32"]
    out["3d"] = count(a, replace(r, spatial_3d=True))
    out["interp"] = count(a, replace(r, upsample="interp"))
    out["z128"] = count(replace(a, z=128), r)
    out["gn"] = count(a, replace(r, norm_affine=True))
    out["noattn"] = count(a, replace(r, no_attn="resblock"))
    return out


# The reading autoencoders/h3ae.py implements (its defaults), and the one it used before.
ADOPTED = Reading(up_k=1, lat_enc_k=1, lat_dec_k=1, dec_extra=1, attn_mlp=0.0, attn_extra="conv3d", attn_dec_extra=1)
OLD = Reading()
# Named readings for the report table: each changes one thing from OLD, then the adopted one.
NAMED = {
    "old code (3x3x3 shuffle + latent convs, N blocks, attn+MLP4)": OLD,
    "1x1 PixelShuffle conv": replace(OLD, up_k=1),
    "1x1 latent convs": replace(OLD, lat_enc_k=1, lat_dec_k=1),
    "1x1 shuffle + 1x1 latent": replace(OLD, up_k=1, lat_enc_k=1, lat_dec_k=1),
    "shuffle C_in -> C_in*r (3x3x3)": replace(OLD, up_expand="in"),
    "decoder N+1 blocks": replace(OLD, dec_extra=1, attn_dec_extra=1),
    "attn block = attn + Conv3D (no MLP)": replace(OLD, attn_mlp=0.0, attn_extra="conv3d"),
    "attn block = attn + MLP4 + ResBlock": replace(OLD, attn_extra="resblock"),
    "SD mid block (2 ResBlocks/side)": replace(OLD, mid=2),
    "down keeps width, 1st block widens": replace(OLD, down="keep"),
    "adopted": ADOPTED,
}

GRID = dict(up_k=(1, 3), up_expand=("out", "in"), lat_enc_k=(1, 3), lat_dec_k=(1, 3), dec_extra=(0, 1),
            attn_mlp=(0.0, 2.0, 4.0), attn_extra=("none", "conv3d", "resblock"), attn_dec_extra=(0, 1),
            down=("conv", "keep"), mid=(0, 1, 2))


def search(configs: tuple[str, ...] = tuple(PAPER)) -> list[tuple[float, Reading, dict[str, float]]]:
    """Every reading of GRID, ranked by its worst relative error over ``configs``."""
    rows = []
    keys = list(GRID)
    for values in itertools.product(*(GRID[k] for k in keys)):
        r = Reading(**dict(zip(keys, values)))
        c = evaluate(r)
        rows.append((max(abs(c[n] / PAPER[n] - 1) for n in configs), r, c))
    rows.sort(key=lambda x: x[0])
    return rows


def fmt(r: Reading, c: dict[str, float]) -> str:
    base = Reading()
    diff = ", ".join(f"{k}={getattr(r, k)}" for k in GRID if getattr(r, k) != getattr(base, k)) or "current"
    cols = " ".join(f"{c[n] / 1e6:7.2f}" for n in c)
    return f"{cols} | {diff}"


def check() -> None:
    """The registered configs and their Tab. 1 variants, built on the meta device, against the
    analytic count of ADOPTED (exact equality)."""
    import torch

    from autoencoders import build
    a = ARCHS["8x32x32"]
    cases = [(f"h3ae-{n}", {}, ARCHS[n], ADOPTED) for n in ARCHS]
    cases += [("h3ae-8x32x32", dict(spatial_3d=True), a, replace(ADOPTED, spatial_3d=True)),
              ("h3ae-8x32x32", dict(upsample="interpolate"), a, replace(ADOPTED, upsample="interp")),
              ("h3ae-8x32x32", dict(latent_channels=128), replace(a, z=128), ADOPTED),
              ("h3ae-8x32x32", dict(norm="group"), a, replace(ADOPTED, norm_affine=True))]
    for name, overrides, arch, reading in cases:
        with torch.device("meta"):
            built = build(name, **overrides).num_parameters()
        analytic = count(arch, reading)
        status = "ok" if built == analytic else "MISMATCH"
        print(f"check {name} {overrides}: built {built:,} analytic {analytic:,} {status}")
        if built != analytic:
            raise SystemExit(1)
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    if args.check:
        check()
    print("named readings: 4x16x16 8x32x32 8x64x64 | Tab.1 of 8x32x32: 3d interp z128 gn noattn  (M)")
    print(f"{'paper':44s}" + " ".join(f"{v / 1e6:7.2f}" for v in PAPER.values()) + " | "
          + " ".join(f"{v / 1e6:6.0f}" for v in TAB1.values()))
    for label, r in NAMED.items():
        c = evaluate(r)
        print(f"{label[:44]:44s}" + " ".join(f"{c[n] / 1e6:7.2f}" for n in PAPER) + " | "
              + " ".join(f"{c[n] / 1e6:6.1f}" for n in TAB1))
    for configs in (tuple(PAPER), ("4x16x16", "8x32x32")):
        print(f"\nbest readings by worst error over {', '.join(configs)}")
        print("worst%  4x16x16 8x32x32 8x64x64 3d interp z128 gn noattn | reading (vs the old code)")
        for err, r, c in search(configs)[:args.top]:
            print(f"{100 * err:5.1f}  {fmt(r, c)}")


if __name__ == "__main__":
    main()
