import pytest
import torch

from dit import REGISTRY, DiTConfig, build, detokenize, load_pretrained, make_config, part_specs, save_pretrained, tokenize
from dit.registry import describe, num_parameters
from dit.tokens import packing
from ldm import flow
from ldm.latent import Cond, Latent, LatentSpec
from ldm.samplers import guided_velocity

from dits import GRID, HIVAE, VARLEN, random_parts, randomize, varlen_batch


def test_trunk_flops_count_each_blocks_attention_groups():
    """``VideoDiT.trunk_flops``: full attention is ``ldm.cost.dit_trunk_flops`` (4 N^2 d per block);
    factorised blocks attend within frames (T groups of S tokens) and sites (S groups of T), and
    over a content grid + token sets within whatever groups their positions make."""
    from ldm.cost import dit_trunk_flops, transformer_block_flops

    parts = {"z": (4, 6, 8, 10)}  # patch (1, 2, 2): T = 6 frames of S = 4 x 5 = 20 tokens
    full = build("dit-debug", parts, patch=(1, 2, 2))
    c = full.config
    assert full.trunk_flops(parts) == dit_trunk_flops(c.depth, c.hidden, 120, c.mlp_ratio)
    assert full.trunk_flops(parts, context=7) == dit_trunk_flops(c.depth, c.hidden, 120, c.mlp_ratio, 7)
    fact = build("dit-debug", parts, patch=(1, 2, 2), attn_layout="factorized")
    spatial = sum(transformer_block_flops(120, c.hidden, c.mlp_ratio, attn_group=20))
    temporal = sum(transformer_block_flops(120, c.hidden, c.mlp_ratio, attn_group=6))
    assert c.depth % 2 == 0 and fact.trunk_flops(parts) == c.depth // 2 * (spatial + temporal)
    hivae = build("dit-debug", HIVAE, attn_layout="factorized")
    n = hivae.num_tokens(HIVAE)
    assert 0 < hivae.trunk_flops(HIVAE) < dit_trunk_flops(c.depth, c.hidden, n, c.mlp_ratio)


# --- tokens ----------------------------------------------------------------------------------
@pytest.mark.parametrize("parts", [GRID, HIVAE])
def test_tokens_round_trip(parts):
    specs = part_specs(parts, (2, 4, 4))
    x = random_parts(parts, 2)
    tok = tokenize(x, specs)
    back = detokenize(tok.features, tok)
    assert all(torch.equal(back[k], x[k]) for k in x)
    assert tok.positions.shape == (2, tok.num_tokens, 3) and tok.valid is None
    if "global" in parts:
        assert tok.features["global"].shape == (2, 8, 3)  # token sets pass through
        g = tok.group("global")
        # (s f, n, 0): global's 2 slots span detailed's 4, so slot 1 sits at t = 2
        assert tok.positions[0, g.offset:g.offset + g.length].tolist()[3:5] == [[0, 3, 0], [2, 0, 0]]


def test_token_set_time_strides_share_one_clock():
    """Hi-VAE at paper size (16 frames): global slot f (f_g = 8) at t = 2 f, detailed slot f (f_d = 16)
    at t = f, the content grid at t = 0; grid-only latents keep their positions bit for bit."""
    from dit.tokens import set_time_strides

    parts = {"content": (4, 1, 32, 32), "global": (8, 8, 4), "detailed": (16, 16, 8)}
    tok = tokenize(random_parts(parts, 1), part_specs(parts, (1, 2, 2)))
    pos = tok.split(tok.positions)
    f, n = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    assert torch.equal(pos["global"][0], torch.stack([2 * f, n, torch.zeros_like(f)], -1).reshape(-1, 3))
    f, n = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    assert torch.equal(pos["detailed"][0], torch.stack([f, n, torch.zeros_like(f)], -1).reshape(-1, 3))
    t, h, w = torch.meshgrid(torch.arange(1), torch.arange(16), torch.arange(16), indexing="ij")
    assert torch.equal(pos["content"][0], torch.stack([t, h, w], -1).reshape(-1, 3))  # (0, i, j) in patch units
    assert [g.time_stride for g in tok.groups] == [1, 2, 1]
    model = build("dit-debug", parts, abs_pos=True)  # the model's RoPE and abs_pos read these positions
    assert torch.equal(model.tokenize(random_parts(parts, 1)).positions, tok.positions)
    # any clip length: f_g = ceil(T / 2) slots still land on frames 0, 2, 4, ...
    assert set_time_strides({"global": 3, "detailed": 5}) == {"global": 2, "detailed": 1}
    assert set_time_strides({"global": 4, "detailed": 16}) == {"global": 4, "detailed": 1}
    assert set_time_strides({"only": 7}) == {"only": 1} and set_time_strides({}) == {}
    odd = {"content": (4, 1, 4, 4), "global": (3, 2, 4), "detailed": (5, 2, 8)}
    tok = tokenize(random_parts(odd, 1), part_specs(odd))
    assert tok.split(tok.positions)["global"][0, ::2, 0].tolist() == [0, 2, 4]
    # a grid latent: positions are the plain (t, h, w) patch grid, as before strides existed
    tok = tokenize(random_parts(GRID, 2), part_specs(GRID, (2, 4, 4)))
    t, h, w = torch.meshgrid(torch.arange(2), torch.arange(2), torch.arange(2), indexing="ij")
    assert torch.equal(tok.positions[1], torch.stack([t, h, w], -1).reshape(-1, 3))
    assert [g.time_stride for g in tok.groups] == [1]


def test_tokens_varlen_round_trip_and_packing():
    lat, _ = varlen_batch()
    specs = part_specs(VARLEN, (2, 2, 2))
    tok = tokenize(lat, specs)
    assert tok.valid.sum(1).tolist() == [3 * 4, 1 * 4, 2 * 4]  # ceil(length / pt) frames of 2x2 tokens
    back = detokenize(tok.features, tok)
    assert torch.equal(back["z"], lat["z"])  # collate pads with zeros, the adapter zeroes padding
    pk = packing(tok.valid)
    assert pk.cu_seqlens.tolist() == [0, 12, 16, 24] and pk.max_seqlen == 12
    feats = pk.pack(tok.features["z"])
    assert feats.shape == (1, 24, 24)
    assert torch.equal(pk.unpack(feats), tok.features["z"] * tok.valid[..., None])


def test_tokens_bad_input():
    specs = part_specs(GRID)
    with pytest.raises(ValueError, match="do not match"):
        tokenize({"y": torch.zeros(1, 4, 3, 6, 5)}, specs)
    with pytest.raises(ValueError, match="grid part"):
        tokenize({"z": torch.zeros(1, 3, 3, 6, 5)}, specs)
    with pytest.raises(ValueError, match="neither a grid"):
        part_specs({"z": (4, 4)})


# --- the model -------------------------------------------------------------------------------
@pytest.mark.parametrize("parts", [GRID, HIVAE, VARLEN])
def test_shapes_for_all_latent_forms(parts):
    model = randomize(build("dit-debug", parts, num_classes=3, text_dim=8))
    if parts is VARLEN:
        x, _ = varlen_batch()
    else:
        x = random_parts(parts, 2)
    B = next(iter(x.values())).shape[0]
    cond = Cond(text=torch.randn(B, 4, 8), class_id=torch.arange(B) % 3)
    v = model(x, torch.rand(B), cond)
    assert set(v) == set(parts)
    assert all(v[k].shape == x[k].shape for k in parts)
    assert all(torch.isfinite(v[k]).all() for k in parts)


def test_output_is_zero_at_init():
    model = build("dit-debug", HIVAE, num_classes=3)
    v = model(random_parts(HIVAE, 2), torch.rand(2), Cond(class_id=torch.tensor([0, 2])))
    assert all(torch.all(t == 0) for t in v.values())


@pytest.mark.parametrize("layout", ["full", "factorized"])
@pytest.mark.parametrize("abs_pos", [False, True])
def test_padded_equals_unpadded_and_packed_equals_padded(layout, abs_pos):
    model = randomize(build("dit-debug", VARLEN, patch=(2, 2, 2), attn_layout=layout, text_dim=8, num_classes=4,
                             abs_pos=abs_pos))
    lat, items = varlen_batch()
    t = torch.tensor([0.3, 0.6, 0.9])
    cond = Cond(text=torch.randn(3, 5, 8), text_mask=torch.tensor([[1, 1, 0, 0, 0], [1] * 5, [1, 1, 1, 0, 0]]).bool(),
                class_id=torch.tensor([0, 3, -1]))
    padded = model(lat, t, cond)["z"]
    packed = model(lat, t, cond, pack=True)["z"]
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    for i, item in enumerate(items):
        n = int(item.aux["length"])
        one = Cond(text=cond.text[i:i + 1], text_mask=cond.text_mask[i:i + 1], class_id=cond.class_id[i:i + 1])
        alone = model(item, t[i:i + 1], one)["z"]
        torch.testing.assert_close(padded[i:i + 1, :, :n], alone, atol=1e-5, rtol=1e-5)
        assert torch.all(padded[i, :, n:] == 0)


def test_absolute_positions_are_fixed_and_used():
    from dit.model import sincos_embedding_3d

    pos = torch.tensor([[0, 0, 0], [3, 1, 2], [3, 1, 2], [0, 1, 2]])
    emb = sincos_embedding_3d(pos, 64)
    assert emb.shape == (4, 64) and torch.equal(emb[1], emb[2]) and not torch.allclose(emb[1], emb[3])
    # only the t channels (64 - 2 * 20 = 24 of them) see the frame index
    torch.testing.assert_close(emb[1, 24:], emb[3, 24:])
    # no weights: the same state dict loads with and without, and the embedding changes the output
    plain = randomize(build("dit-debug", GRID, num_classes=3))
    absolute = build("dit-debug", GRID, num_classes=3, abs_pos=True)
    absolute.load_state_dict(plain.state_dict())
    x, t, cond = random_parts(GRID, 2), torch.rand(2), Cond(class_id=torch.tensor([0, 2]))
    assert not torch.allclose(plain(x, t, cond)["z"], absolute(x, t, cond)["z"])
    with pytest.raises(ValueError, match="even hidden"):
        make_config("dit-debug", GRID, hidden=63, heads=3, abs_pos=True)


def test_cfg_scale_one_equals_conditional_and_null_class():
    model = randomize(build("dit-debug", GRID, num_classes=5, text_dim=8))
    x, t = random_parts(GRID, 2), torch.rand(2)
    cond = Cond(text=torch.randn(2, 3, 8), text_mask=torch.ones(2, 3, dtype=torch.bool), class_id=torch.tensor([1, 4]))
    null = model.null_cond(cond)
    v1 = guided_velocity(model, x, t, cond, null, 1.0)
    torch.testing.assert_close(v1["z"], model(x, t, cond)["z"], atol=1e-5, rtol=1e-5)
    vu = model(x, t, null)["z"]
    assert not torch.allclose(vu, v1["z"])
    # the null condition is the same as no condition at all
    torch.testing.assert_close(vu, model(x, t, Cond())["z"], atol=1e-5, rtol=1e-5)
    # dropping only sample 1 nulls sample 1 only
    part = model(x, t, model.null_cond(cond, drop=torch.tensor([False, True])))["z"]
    torch.testing.assert_close(part[0], v1["z"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part[1], vu[1], atol=1e-5, rtol=1e-5)


def test_text_mask_is_respected():
    model = randomize(build("dit-debug", HIVAE, text_dim=8))
    x, t = random_parts(HIVAE, 2), torch.rand(2)
    text = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]).bool()
    v = model(x, t, Cond(text=text, text_mask=mask))
    text2 = torch.where(mask[..., None], text, torch.randn(2, 6, 8) * 10)
    v2 = model(x, t, Cond(text=text2, text_mask=mask))
    assert all(torch.allclose(v[k], v2[k], atol=1e-5) for k in v)
    v3 = model(x, t, Cond(text=text2, text_mask=torch.ones_like(mask)))
    assert not torch.allclose(v3["content"], v["content"])


def test_first_frame_tokens_condition_but_are_not_denoised():
    model = randomize(build("dit-debug", GRID, first_frame_channels=4))
    x, t = random_parts(GRID, 2), torch.rand(2)
    ff = torch.randn(2, 4, 1, 6, 5)
    v = model(x, t, Cond(first_frame=ff))
    assert set(v) == {"z"}
    assert not torch.allclose(v["z"], model(x, t, Cond(first_frame=ff + 1))["z"])
    assert model.tokenize(x, Cond(first_frame=ff)).num_tokens == model.num_tokens(GRID) + 3 * 3
    with pytest.raises(ValueError, match="first_frame"):
        model(x, t, Cond(first_frame=torch.randn(2, 4, 2, 6, 5)))
    with pytest.raises(ValueError, match="no class conditioning"):
        model(x, t, Cond(class_id=torch.tensor([0, 1])))


def test_one_step_lowers_the_flow_loss():
    torch.manual_seed(0)
    model = build("dit-debug", HIVAE, num_classes=3)
    x0 = random_parts(HIVAE, 4, seed=1)
    noise = random_parts(HIVAE, 4, seed=2)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    cond = Cond(class_id=torch.tensor([0, 1, 2, -1]))
    xt, target = flow.interpolate(x0, noise, t), flow.velocity_target(x0, noise)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = flow.flow_loss(model(xt, t, cond), target).mean()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = flow.flow_loss(model(xt, t, cond), target).mean()
    assert after < before


# --- registry --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_dit_builds(name):
    """A new registry entry is checked here with no test to write: it builds (on the meta device)."""
    assert describe(name)["params"] > 0


def test_a_head_dim_rope_cannot_split_is_a_config_error():
    """Caught where the config is written (the registry, an override), not at the first forward."""
    for bad, match in (({"hidden": 100, "heads": 4}, "head dim 25: 3D RoPE needs an even head dim"),
                       ({"hidden": 64, "heads": 4, "rope_axes": (6, 6, 6)}, "summing to the head dim 16")):
        with pytest.raises(ValueError, match=match):
            DiTConfig(**bad)
        with pytest.raises(ValueError, match=match):
            make_config("dit-debug", {"z": (4, 2, 8, 8)}, **bad)


def test_registry_sizes_and_parameter_counts():
    assert {"dit-debug", "dit-S", "dit-B", "dit-L", "dit-XL", "dit-standard"} <= set(REGISTRY)
    std = make_config("dit-standard", {"z": (4, 4, 32, 32)})
    ffn = int(std.hidden * std.mlp_ratio)
    assert (std.depth, std.heads, std.hidden, ffn, std.attn_layout) == (8, 8, 512, 2048, "full")
    xl = make_config("dit-XL", {"z": (4, 4, 32, 32)}, patch=(1, 2, 2))
    # DiT-XL/2 has 675M parameters for 4x32x32 latents with 1000 classes and learned sigma (Peebles & Xie, Tab. 1);
    # ours adds QK-norm and 3D RoPE but drops sigma and the positional table: within 1 %.
    n = num_parameters(make_config("dit-XL", {"z": (4, 4, 32, 32)}, num_classes=1000))
    assert abs(n - 675e6) / 675e6 < 0.01, n
    assert num_parameters(xl) > num_parameters(std)
    d = describe("dit-standard", LatentSpec("grid", {"z": (16, 5, 32, 32)}, (3, 17, 256, 256)))
    assert d["params"] > 0 and d["ffn"] == 2048
    with pytest.raises(ValueError, match="unknown override"):
        make_config("dit-debug", GRID, width=3)
    with pytest.raises(KeyError, match="unknown DiT"):
        build("dit-XXL", GRID)
    with pytest.raises(ValueError, match="latent_parts"):
        build("dit-debug")


def test_meta_device_forward_for_cost_accounting():
    with torch.device("meta"):
        model = build("dit-standard", {"z": (4, 5, 32, 32)})
        v = model({"z": torch.empty(1, 4, 5, 32, 32)}, torch.empty(1))
    assert v["z"].shape == (1, 4, 5, 32, 32)


def test_save_load_round_trip(tmp_path):
    model = randomize(build("dit-debug", HIVAE, num_classes=3, text_dim=8, attn_layout="factorized"))
    save_pretrained(model, tmp_path / "ckpt", name="dit-debug")
    loaded = load_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config  # JSON sorts the parts; dict equality ignores order
    x, t = random_parts(HIVAE, 2), torch.rand(2)
    cond = Cond(text=torch.randn(2, 3, 8), class_id=torch.tensor([0, 2]))
    a, b = model(x, t, cond), loaded(x, t, cond)
    for k in a:  # same function; the token order may differ, so only up to float rounding
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["flex", "math", "flash", "xformers"])
def test_attention_backends_agree_inside_the_model(backend, monkeypatch):
    import standin_kernels

    standin_kernels.install(monkeypatch)  # flash / xformers: their call paths, computed with SDPA
    model = randomize(build("dit-debug", VARLEN, patch=(2, 2, 2), attn_layout="factorized", text_dim=8))
    lat, _ = varlen_batch()
    t, cond = torch.rand(3), Cond(text=torch.randn(3, 4, 8), text_mask=torch.tensor([[1, 0, 0, 0]] * 3).bool())
    with torch.no_grad():  # torch's FlexAttention has no CPU backward
        ref = model(lat, t, cond, pack=True)["z"]
        model.set_attention_backend(backend)
        torch.testing.assert_close(model(lat, t, cond, pack=True)["z"], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(lat, t, cond)["z"], ref, atol=1e-5, rtol=1e-5)


def test_model_dtype_casts_inputs_and_returns_part_dtype():
    model = randomize(build("dit-debug", GRID)).to(torch.bfloat16)
    x = random_parts(GRID, 2)
    v = model(x, torch.rand(2))
    assert v["z"].dtype == torch.float32 and torch.isfinite(v["z"]).all()


def test_guided_sampling_through_the_dit_is_seeded():
    from ldm.samplers import euler, initial_noise

    model = randomize(build("dit-debug", VARLEN, patch=(2, 2, 2), num_classes=3, text_dim=8))
    cond = Cond(text=torch.randn(2, 3, 8), class_id=torch.tensor([0, 2]))

    def run(seed):
        noise = Latent(initial_noise(VARLEN, 2, seed=seed), "varlen", aux={"length": torch.tensor([5, 3])})
        with torch.no_grad():
            return euler(model, noise, cond, steps=2, guidance_scale=3.0, null_cond=model.null_cond(cond))

    a, b = run(0), run(0)
    assert isinstance(a, Latent) and a["z"].shape == (2, *VARLEN["z"]) and torch.equal(a["z"], b["z"])
    assert not torch.equal(a["z"], run(1)["z"])
