"""Regional compilation of the transformer blocks (``ldm.layers.compile_blocks``): compiled and
eager DiTs agree on every latent form, train the same, and varying token counts do not recompile
without end.

Most tests compile with the ``aot_eager`` backend: dynamo captures the graph and AOT autograd
builds the joint forward/backward exactly as for inductor, so graph breaks, guards, dynamic shapes
and autograd through the compiled region are all exercised, in seconds. One test runs inductor
itself (C++ code generation on CPU; Triton on GPU is covered by ``benchmarks/gpu_dit.py``), one more
under ``slow`` (H3AE's encoder, ``ldm extract --compile``).
Tolerances: 1e-5 (aot_eager runs the same kernels as eager), 1e-4 for inductor (fused kernels
reorder float32 sums).
"""
import copy

import pytest
import torch

import dit
from ldm.latent import Cond, Latent
from ldm.layers import compile_blocks, uncompile_blocks

from dits import GRID, HIVAE, VARLEN, random_parts, randomize, varlen_batch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CountingBackend:
    """A dynamo backend that counts the graphs it is given and runs them as captured: through AOT
    autograd (forward and backward graphs, as inductor gets them), or with ``aot=False`` as dynamo
    captured them, for the tests that count recompiles of forward passes (several times faster
    with dynamic shapes; the graph count is dynamo's either way)."""

    def __init__(self, aot: bool = True):
        self.graphs = 0
        self.aot = aot

    def __call__(self, gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.graphs += 1
        if not self.aot:
            return gm.forward
        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward),
                            bw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)


def _pair(parts, **kw):
    eager = randomize(dit.build("dit-debug", parts, **kw))
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled, backend="aot_eager") == eager.config.depth
    return eager, compiled


def _text_cond(B):
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(B, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return Cond(text=torch.randn(B, 5, 8, generator=g), text_mask=mask, class_id=torch.arange(B) % 4 - 1)


@pytest.mark.parametrize("form", ["grid", "tokens", "varlen-padded", "varlen-packed", "factorized"])
def test_compiled_equals_eager_forward_and_gradients(form):
    parts = {"grid": GRID, "tokens": HIVAE, "factorized": GRID}.get(form, VARLEN)
    kw = dict(text_dim=8, num_classes=4, attn_layout="factorized" if form == "factorized" else "full")
    eager, compiled = _pair(parts, **kw)
    x = varlen_batch()[0] if form.startswith("varlen") else random_parts(parts, 3)
    t, cond = torch.tensor([0.2, 0.5, 0.9]), _text_cond(3)
    pack = form == "varlen-packed"
    outs = []
    for model in (eager, compiled):
        out = model(x, t, cond, pack=pack)
        loss = sum(v.square().mean() for v in out.values())
        loss.backward()
        outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (out_e, grad_e), (out_c, grad_c) = outs
    for k in out_e:
        torch.testing.assert_close(out_c[k], out_e[k], atol=1e-5, rtol=1e-5)
    assert grad_e.keys() == grad_c.keys() and len(grad_e) > 10
    for n in grad_e:
        torch.testing.assert_close(grad_c[n], grad_e[n], atol=1e-5, rtol=1e-5)


def test_token_count_changes_recompile_once_not_per_shape():
    """Buckets and varlen batches change the token count and batch every step: after the first
    recompile the sizes are dynamic, so a few shapes compile every graph there is (the first shape,
    the dynamic one, batch 1 which dynamo specialises) and new shapes compile nothing."""
    model = randomize(dit.build("dit-debug", {"z": (4, 8, 8, 8)}, num_classes=4))
    backend = CountingBackend(aot=False)
    compile_blocks(model, backend=backend)

    def run(shapes):
        for B, T, H in shapes:
            model({"z": torch.randn(B, 4, T, H, H)}, torch.rand(B), Cond(class_id=torch.zeros(B, dtype=torch.long)))

    run([(2, 2, 4), (3, 4, 6), (1, 5, 8)])
    assert 1 <= backend.graphs <= 3, backend.graphs
    warm = backend.graphs
    run([(4, 3, 4), (2, 8, 8), (5, 1, 6), (1, 7, 4), (6, 6, 6)])
    assert backend.graphs == warm
    # padded varlen rows: the attention with ids runs eagerly between compiled pieces, each of
    # which also goes dynamic after its first recompile
    vmodel = randomize(dit.build("dit-debug", VARLEN))
    compile_blocks(vmodel, backend=backend)
    for lengths in [(5, 2, 3), (4, 4), (3,)]:
        vmodel(varlen_batch(lengths)[0], torch.rand(len(lengths)))
    warm = backend.graphs
    for lengths in [(1, 2, 3, 5), (2, 5, 5, 1, 4), (5,), (3, 3)]:
        vmodel(varlen_batch(lengths)[0], torch.rand(len(lengths)))
    assert backend.graphs == warm


@pytest.mark.slow  # ~30 s of dynamo tracing for the non-default layout; its compiled-equals-eager tests stay fast
def test_factorised_trunk_compiles_its_groups_and_stays_compiled():
    """Spatial / temporal blocks over a grid attend in dense groups inside the compiled block (no
    eager attention between pieces): one graph per block kind and size regime (first sizes,
    dynamic, batch 1, one frame), then new shapes find a graph (none recompiles, none falls back to
    eager at dynamo's recompile limit)."""
    model = randomize(dit.build("dit-debug", {"z": (4, 8, 8, 8)}, num_classes=4, attn_layout="factorized"))
    backend = CountingBackend(aot=False)
    compile_blocks(model, backend=backend)

    def run(shapes):
        for B, T, H in shapes:
            model({"z": torch.randn(B, 4, T, H, H)}, torch.rand(B), Cond(class_id=torch.zeros(B, dtype=torch.long)))

    run([(2, 2, 4)])
    assert backend.graphs == 2  # spatial + temporal, each one whole block
    run([(3, 4, 6), (1, 5, 8), (2, 1, 4)])
    warm = backend.graphs
    assert warm <= 8, warm
    with torch.compiler.set_stance("fail_on_recompile"):
        run([(4, 3, 4), (2, 8, 8), (5, 1, 6), (1, 7, 4), (6, 6, 6), (3, 9, 4), (1, 3, 6)])
    assert backend.graphs == warm
    run([(2, 3, 2)])  # one token per frame: two more regimes, past dynamo's default limit of 8 graphs
    assert backend.graphs == warm + 2
    with torch.compiler.set_stance("fail_on_recompile"):
        run([(3, 5, 2)])


def test_uncompile_and_state_dict_unchanged():
    eager, compiled = _pair(GRID)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    uncompile_blocks(compiled)
    assert all(blk.compiled_core is None for blk in compiled.blocks)
    x, t = random_parts(GRID, 2), torch.rand(2)
    torch.testing.assert_close(compiled(x, t)["z"], eager(x, t)["z"])


def test_a_few_training_steps_agree():
    """Five AdamW steps of the flow loss: compiled and eager losses agree step by step."""
    from launch.train import FlowConfig, flow_draws, flow_step_loss, sample_generators

    eager, compiled = _pair(GRID, num_classes=4)
    fcfg = FlowConfig(cond_dropout=0.2)
    losses = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[name] = []
        for step in range(5):
            lat = Latent(random_parts(GRID, 4, seed=step))
            draws = flow_draws(lat, fcfg, sample_generators(0, list(range(4 * step, 4 * step + 4))))
            loss = flow_step_loss(model, lat, Cond(class_id=torch.tensor([0, 1, 2, 3])), fcfg, draws, model.null_cond)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)
    assert losses["eager"][-1] < losses["eager"][0]


@pytest.mark.parametrize("attn_layout", ["full", "factorized"])
def test_activation_checkpointing_with_compiled_blocks(attn_layout):
    from launch.engine import apply_activation_checkpointing

    eager, compiled = _pair(GRID, attn_layout=attn_layout)
    apply_activation_checkpointing(compiled.blocks)
    x, t = random_parts(GRID, 2), torch.rand(2)
    for model in (eager, compiled):
        model(x, t)["z"].square().mean().backward()
    for (n, pe), (_, pc) in zip(eager.named_parameters(), compiled.named_parameters()):
        if pe.grad is not None:
            torch.testing.assert_close(pc.grad, pe.grad, atol=1e-5, rtol=1e-5)


def test_inductor_compiled_block_matches_eager():
    """The real compiler (inductor; C++ kernels on CPU) on the tiniest trunk: forward and backward."""
    eager = randomize(dit.build("dit-debug", GRID, depth=1, hidden=32, heads=2, num_classes=4))
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    x, t, cond = random_parts(GRID, 2), torch.rand(2), Cond(class_id=torch.tensor([1, -1]))
    out_e, out_c = eager(x, t, cond)["z"], compiled(x, t, cond)["z"]
    torch.testing.assert_close(out_c, out_e, atol=1e-4, rtol=1e-4)
    out_e.square().mean().backward()
    out_c.square().mean().backward()
    for pe, pc in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, atol=1e-4, rtol=1e-4)


def test_compile_switch_is_validated(tmp_path):
    from launch.engine import resolve_precision, resolve_switch

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_switch("auto", cpu, "model.compile") is False and resolve_switch("auto", cuda, "k") is True
    assert resolve_switch(True, cpu, "k") is True and resolve_switch(False, cuda, "k") is False
    with pytest.raises(ValueError, match="model.compile must be true, false or auto"):
        resolve_switch("yes", cpu, "model.compile")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("auto", cuda) == "bf16"
    with pytest.raises(ValueError, match="engine.precision"):
        resolve_precision("fp16", cpu)
    from launch.train import TrainConfig
    from ldm import config as cfglib

    cfg = cfglib.from_dict(TrainConfig, cfglib.apply_dotted({}, ["model.compile=true", "engine.precision=bf16"]))
    assert cfg.model.compile is True and cfg.engine.precision == "bf16"
    assert cfglib.from_dict(TrainConfig, cfglib.apply_dotted({}, ["model.compile=auto"])).model.compile == "auto"


def test_compile_mode_reaches_torch_compile(monkeypatch):
    """``model.compile_mode`` / ``compile_blocks(mode=)``: inductor's default is passed as no mode,
    autotuning by its name; anything else is refused before compiling."""
    from ldm import layers

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw["mode"]) or fn)
    model = dit.build("dit-debug", GRID)
    layers.compile_blocks(model, mode="default")
    layers.compile_blocks(model, mode="max-autotune-no-cudagraphs")
    layers.compile_blocks(model)
    assert seen == [None, "max-autotune-no-cudagraphs", None]
    with pytest.raises(ValueError, match="compile mode must be one of"):
        layers.compile_blocks(model, mode="reduce-overhead")  # the DiT's shapes vary: no CUDA graphs
    assert len(seen) == 3
    # an autoencoder's encode (ldm extract --compile) takes CUDA graphs too
    import autoencoders

    ae = autoencoders.build("kl2d-f8c4-debug")
    for mode in ("reduce-overhead", "default"):
        ae.compile_encode(mode)
    assert seen[3:] == ["reduce-overhead", None] and ae.encode_compiled
    with pytest.raises(ValueError, match="compile mode must be one of"):
        ae.compile_encode("max-autotune")


def test_text_conditioned_block_compiles_without_graph_breaks():
    """Cross-attention to a padded caption (a key-padding mask) stays inside the compiled block:
    one graph for the whole block, not pieces around an eager attention call."""
    model = randomize(dit.build("dit-debug", GRID, text_dim=8, num_classes=4))
    backend = CountingBackend()
    compile_blocks(model, backend=backend)
    model(random_parts(GRID, 3), torch.rand(3), _text_cond(3))
    assert backend.graphs == 1


def test_caption_lengths_compile_once_more_not_per_length():
    """Batches pad their captions to their longest, so the context length changes from batch to
    batch: the shared block compiles its first length, then once with a dynamic length, and no
    more for any other (training steps, forward and backward)."""
    model = randomize(dit.build("dit-debug", GRID, text_dim=8, num_classes=4))
    backend = CountingBackend()
    compile_blocks(model, backend=backend)
    graphs = []
    for L in (3, 5, 9, 2, 12, 1, 4):
        mask = torch.arange(L)[None] < torch.tensor([L, max(1, L - 1), 1])[:, None]
        cond = Cond(text=torch.randn(3, L, 8), text_mask=mask, class_id=torch.tensor([0, 1, -1]))
        model(random_parts(GRID, 3), torch.rand(3), cond)["z"].square().mean().backward()
        graphs.append(backend.graphs)
    assert graphs == [1] + [2] * 6


def test_hivae_decoder_blocks_compile_whole():
    """``ldm sample --compile`` compiles a diffusion decoder's blocks too: Hi-VAE's spatial (with
    cross-attention to the motion tokens) and temporal blocks are one graph each, decoding as eager."""
    import autoencoders

    torch.manual_seed(0)
    ae = autoencoders.build("hivae-debug").eval()
    with torch.no_grad():
        latent = ae.encode(torch.rand(1, 3, 9, 32, 32) * 2 - 1)
        eager = ae.decode(latent, steps=2)
        backend = CountingBackend()
        from ldm.layers import TransformerBlock
        assert compile_blocks(ae, backend=backend) == sum(isinstance(m, TransformerBlock) for m in ae.modules())
        torch.testing.assert_close(ae.decode(latent, steps=2), eager, atol=1e-5, rtol=1e-5)
    assert backend.graphs == 2



def _h3ae_and_clip():
    import autoencoders

    torch.manual_seed(0)
    return autoencoders.build("h3ae-8x32x32-debug").eval(), torch.rand(2, 3, 9, 32, 32) * 2 - 1


@torch.no_grad()
def test_h3ae_encoder_compiles_whole():
    """``ldm extract --compile``'s `Autoencoder.compile_encode` on H3AE, the encoder with the most small
    kernels: one graph (its block-causal attention is traced in: it was a graph break in each block)
    that encodes as eager does."""
    ae, video = _h3ae_and_clip()
    eager = ae.encode(video)
    backend = CountingBackend(aot=False)
    ae.compile_encode(backend=backend)
    assert ae.encode_compiled
    torch.testing.assert_close(ae.encode(video)["z"], eager["z"], atol=1e-5, rtol=1e-5)
    assert backend.graphs == 1


@pytest.mark.slow  # ~35 s of C++ code generation on 2 cores
@torch.no_grad()
def test_h3ae_inductor_encode_matches_eager():
    ae, video = _h3ae_and_clip()
    eager = ae.encode(video)
    ae.compile_encode()
    torch.testing.assert_close(ae.encode(video)["z"], eager["z"], atol=1e-4, rtol=1e-4)


def _registered_debug_autoencoders() -> list[str]:
    from aes import registered

    return registered(True)


@pytest.mark.slow  # ~10 minutes of dynamo tracing for every registered -debug encoder (MTC-VAE's alone take minutes)
@pytest.mark.parametrize("name", _registered_debug_autoencoders())
@torch.no_grad()
def test_every_encoder_is_captured_by_the_compiler(name):
    """``ldm extract --compile`` for every family: dynamo captures the encoder (one graph; MTC-VAE's rate
    choice reads values on the host, so several) and the captured graphs encode as eager does."""
    import autoencoders
    from aes import example_batch

    torch.manual_seed(0)
    ae = autoencoders.build(name).eval()
    video, cond = example_batch(ae)
    eager = ae.encode(video, cond)
    backend = CountingBackend(aot=False)
    ae.compile_encode(backend=backend)
    compiled = ae.encode(video, cond)
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], atol=1e-5, rtol=1e-5)
    assert backend.graphs == 1 or (ae.family == "mtcvae" and backend.graphs > 1), backend.graphs
