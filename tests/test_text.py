import hashlib
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from ldm.text import BuiltinTextEncoder, TextEncoder, build_text_encoder
from texts import save_t5, tokenizer


# ------------------------------------------------------------------------------------ builtin

def _weights_sha256(enc: TextEncoder) -> str:
    h = hashlib.sha256()
    for k, v in sorted(enc.state_dict().items()):
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_builtin_weights_are_fixed_across_processes_and_machines():
    # the weights come from a counter-based generator: this digest must never change
    enc = build_text_encoder("builtin")
    assert _weights_sha256(enc) == "815d3a276cbafac80c27f9be2830911aae3275c24f9f3f3f485e4fd1d34ebdee"
    emb, _ = enc.encode(["a red circle moving left"])
    expected = torch.tensor([[-0.84835118, 1.03154945, -1.61937690, 1.62888622],
                             [-1.09455192, 0.19531815, -0.99010682, 1.11484206],
                             [-1.30536056, 0.77279603, -0.56340492, -1.10719550]])
    torch.testing.assert_close(emb[0, [0, 3, 25], :4], expected, atol=1e-4, rtol=0)


def test_builtin_deterministic_on_rebuild_and_batch_independent():
    prompts = ["a red circle moving left", "a big blue square moving up", ""]
    e1, m1 = build_text_encoder("builtin").encode(prompts)
    e2, m2 = build_text_encoder("builtin").encode(prompts)
    assert torch.equal(e1, e2) and torch.equal(m1, m2)
    alone, _ = build_text_encoder("builtin").encode(prompts[1:2])
    torch.testing.assert_close(alone[0], e1[1], atol=1e-5, rtol=0)


def test_builtin_shapes_masks_and_padding():
    enc = build_text_encoder("builtin")
    assert isinstance(enc, BuiltinTextEncoder) and enc.spec == "builtin"
    assert enc.dim == 256 and enc.max_length == 64
    prompts = ["a red circle moving left", "", "x" * 200, "grün"]
    emb, mask = enc.encode(prompts)
    assert emb.shape == (4, 64, 256) and emb.dtype == torch.float32
    assert mask.shape == (4, 64) and mask.dtype == torch.bool
    # BOS + bytes + EOS, cut at max_length; "ü" is two UTF-8 bytes
    assert mask.sum(1).tolist() == [24 + 2, 2, 64, 5 + 2]
    assert torch.equal(mask, torch.arange(64)[None] < mask.sum(1, keepdim=True))  # right padded
    assert (emb[~mask] == 0).all() and (emb[mask].abs().sum(-1) > 0).all()
    ids, _, _ = enc.tokenize(["x" * 200])
    assert ids[0, -1].item() == 2  # a cut prompt still ends with EOS
    assert enc.pool(emb, mask).shape == (4, 256)


def test_builtin_distinct_prompts_and_words_recognisable():
    enc = build_text_encoder("builtin")
    prompts = [f"a {c} {s} moving {d}" for c in ("red", "blue") for s in ("circle", "square")
               for d in ("left", "up")]
    emb, mask = enc.encode(prompts)
    flat = emb.flatten(1)
    assert torch.cdist(flat, flat)[~torch.eye(len(prompts), dtype=torch.bool)].min() > 1.0

    def word(prompt: str, w: str) -> torch.Tensor:
        e, _ = enc.encode([prompt])
        i = prompt.encode().index(w.encode()) + 1  # +1 for BOS
        return e[0, i:i + len(w)].mean(0)

    red1, red2 = word("a red circle moving left", "red"), word("a small red square moving up", "red")
    blue = word("a red circle or a blue circle", "blue")
    assert F.cosine_similarity(red1, red2, dim=0) > 0.8
    assert F.cosine_similarity(red1, red2, dim=0) > F.cosine_similarity(red1, blue, dim=0) + 0.4
    # case does not change a word's identity vector, only its bytes
    assert F.cosine_similarity(word("a Red circle", "Red"), red1, dim=0) > 0.6


def test_builtin_frozen_and_input_checks():
    enc = build_text_encoder("builtin", max_length=16)
    assert enc.max_length == 16 and enc.encode(["a red circle moving left"])[1].sum() == 16
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training
    with pytest.raises(TypeError, match="list of prompts"):
        enc.encode("a red circle")
    with pytest.raises(ValueError, match="at least one"):
        enc.encode([])
    for bad in ("builtin:x", "t5", "bert:/x", "foo"):
        with pytest.raises(ValueError, match="unknown text encoder spec"):
            build_text_encoder(bad)


# ------------------------------------------------------------------------------------ T5 / CLIP

@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return save_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("pipe")  # diffusers pipeline layout
    tok, vocab = tokenizer("<|startoftext|>", "<|endoftext|>", "<|endoftext|>")
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"])
    CLIPTextModel(cfg).save_pretrained(root / "text_encoder")
    tok.save_pretrained(root / "tokenizer")
    return root


def test_t5_from_local_dir(t5_dir):
    from transformers import AutoTokenizer, T5EncoderModel

    spec = f"t5:{t5_dir}"
    enc = build_text_encoder(spec)
    assert enc.spec == spec and enc.dim == 32 and enc.max_length == 120
    prompts = ["a red circle moving left", "big", "a purple circle"]  # "purple" is <unk>
    emb, mask = enc.encode(prompts)
    assert emb.shape == (3, 120, 32) and emb.dtype == torch.float32
    assert mask.sum(1).tolist() == [6, 2, 4]  # words + EOS
    assert (emb[~mask] == 0).all()
    # equals the model's last hidden state at real tokens
    tok = AutoTokenizer.from_pretrained(t5_dir)
    model = T5EncoderModel.from_pretrained(t5_dir).eval()
    b = tok(prompts[:1], return_tensors="pt")
    with torch.no_grad():
        ref = model(**b).last_hidden_state[0]
    torch.testing.assert_close(emb[0, :6], ref, atol=1e-5, rtol=1e-5)
    # deterministic across builds; padding does not leak into real tokens
    emb2, _ = build_text_encoder(spec, max_length=8).encode(prompts)
    torch.testing.assert_close(emb2, emb[:, :8], atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training
    torch.testing.assert_close(enc.pool(emb, mask)[1], emb[1, :2].mean(0))


def test_umt5_loads_as_umt5_with_wans_length(tmp_path):
    """A UMT5 folder (Wan's text encoder) given as t5:DIR loads as UMT5EncoderModel, whose layers
    each keep their relative position bias (T5EncoderModel dropped them: other embeddings), and
    pads to Wan's 512 tokens; also from a pipeline's text_encoder/ + tokenizer/."""
    from transformers import AutoTokenizer, T5EncoderModel, UMT5EncoderModel

    folder = save_t5(tmp_path / "umt5", umt5=True)
    enc = build_text_encoder(f"t5:{folder}")
    assert type(enc.model) is UMT5EncoderModel and (enc.dim, enc.max_length) == (32, 512)
    emb, mask = enc.encode(["a red circle moving left"])
    assert mask.sum().item() == 6 and (emb[~mask] == 0).all()
    ids = AutoTokenizer.from_pretrained(folder)(["a red circle moving left"], return_tensors="pt")
    with torch.no_grad():
        ref = UMT5EncoderModel.from_pretrained(folder).eval()(**ids).last_hidden_state[0]
        as_t5 = T5EncoderModel.from_pretrained(folder).eval()(**ids).last_hidden_state[0]
    torch.testing.assert_close(emb[0, :6], ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(as_t5, ref, atol=1e-3)  # what loading it as T5 computed
    pipe = tmp_path / "wan"
    (pipe / "text_encoder").mkdir(parents=True)
    for f in folder.iterdir():
        target = pipe / ("text_encoder" if f.name in ("config.json", "model.safetensors") else "tokenizer") / f.name
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(f.read_bytes())
    torch.testing.assert_close(build_text_encoder(f"t5:{pipe}").encode(["a red circle moving left"])[0], emb)


def test_clip_from_pipeline_dir(clip_dir):
    from transformers import CLIPTextModel

    enc = build_text_encoder(f"clip:{clip_dir}")
    assert enc.dim == 32 and enc.max_length == 77
    prompts = ["a red circle moving left", "up"]
    emb, mask = enc.encode(prompts)
    assert emb.shape == (2, 77, 32)
    assert mask.sum(1).tolist() == [7, 3]  # BOS + words + EOS
    assert (emb[~mask] == 0).all()
    model = CLIPTextModel.from_pretrained(clip_dir / "text_encoder").eval()
    ids = enc.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(**ids)
    torch.testing.assert_close(enc.pool(emb, mask), out.pooler_output, atol=1e-5, rtol=1e-5)
    emb2, _ = build_text_encoder(f"clip:{clip_dir}").encode(prompts)
    assert torch.equal(emb, emb2)
    with pytest.raises(ValueError, match="exceeds"):
        build_text_encoder(f"clip:{clip_dir}", max_length=78)


def test_wrong_folders_are_clear_errors_not_random_weights(t5_dir, clip_dir, tmp_path):
    """transformers builds a CLIP from a T5 folder (and a T5 tokenizer without its files) with
    random weights and only a log line: each such folder is refused."""
    with pytest.raises(ValueError, match=f"holds a 't5' model, not a CLIP text encoder .*pass it as t5:{t5_dir}"):
        build_text_encoder(f"clip:{t5_dir}")
    with pytest.raises(ValueError, match=f"'clip_text_model' model, not a T5 .*pass it as clip:{clip_dir}$"):
        build_text_encoder(f"t5:{clip_dir}")  # a pipeline folder
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((t5_dir / f).read_bytes())
    with pytest.raises(ValueError, match="no tokenizer in"):
        build_text_encoder(f"t5:{no_tok}")
    (no_tok / "model.safetensors").unlink()
    (no_tok / "tokenizer.json").write_bytes((t5_dir / "tokenizer.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="no file named"):
        build_text_encoder(f"t5:{no_tok}")
    (no_tok / "model.safetensors").write_bytes((clip_dir / "text_encoder" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="lack .* tensor.s. of a T5EncoderModel"):
        build_text_encoder(f"t5:{no_tok}")
    vae = tmp_path / "vae"  # a diffusers folder
    vae.mkdir()
    (vae / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(ValueError, match="holds no transformers model"):
        build_text_encoder(f"t5:{vae}")
    with pytest.raises(ValueError, match="unknown text encoder spec"):
        build_text_encoder("t5")


def test_recorded_spec_is_absolute_and_checked_at_sampling(t5_dir, tmp_path, monkeypatch):
    """A manifest records the folder absolutely (sampling from another directory finds it); the DiT's
    text encoder that moved, now gives another width (was: a traceback) or embeds a probe prompt
    differently (was: sampled with the wrong encoder) is a one-line error."""
    from dit import Export, load_text_encoder
    from ldm.artifacts import AERecord, ClipSpec
    from ldm.errors import MissingInput, UserError
    from ldm.text import absolute_spec, fingerprint, same_fingerprint

    monkeypatch.chdir(t5_dir.parent)
    spec = absolute_spec(f"t5:{t5_dir.name}")
    assert spec == f"t5:{t5_dir}" and absolute_spec("builtin") == "builtin"
    export = Export(AERecord(name="kl2d-f8c4-debug", family="kl2d"), ClipSpec(8, 32, 32), {}, "grid",
                    text_encoder=spec, text_dim=32)
    monkeypatch.chdir(tmp_path)
    assert load_text_encoder(export).dim == 32
    with pytest.raises(UserError, match="now gives 32-d embeddings, the DiT was trained on 48-d"):
        load_text_encoder(Export(**{**export.__dict__, "text_dim": 48}))
    with pytest.raises(MissingInput, match="recorded at extraction.*not found.*put that folder back") as e:
        load_text_encoder(Export(**{**export.__dict__, "text_encoder": f"t5:{tmp_path / 'moved'}"}))
    assert "pass its path" not in str(e.value)  # sampling takes no path: it was "download ... and pass its path"
    # the same width, other weights (a folder replaced by another model): caught by the fingerprint
    fp = fingerprint(build_text_encoder(spec))
    assert len(fp) == 16 and same_fingerprint(fp, [v + 1e-4 for v in fp])
    assert load_text_encoder(Export(**{**export.__dict__, "text_fingerprint": fp})).dim == 32
    other = fingerprint(build_text_encoder("builtin"))
    assert not same_fingerprint(fp, other) and not same_fingerprint(fp, fp[:8])
    with pytest.raises(UserError, match="embeds a probe prompt differently than at extraction"):
        load_text_encoder(Export(**{**export.__dict__, "text_fingerprint": other}))


def test_missing_local_dir_is_a_clear_error(tmp_path):
    missing = tmp_path / "flan-t5-xl"
    with pytest.raises(FileNotFoundError, match="flan-t5-xl"):
        build_text_encoder(f"t5:{missing}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_text_encoder(f"clip:{tmp_path / 'empty'}")


def test_tokenizer_folders_without_a_vocabulary_are_one_line(t5_dir, tmp_path, monkeypatch):
    """A T5 folder as google/t5-v1_1-xxl ships it (spiece.model, no tokenizer.json) needs the
    sentencepiece package (was: transformers' "`tiktoken` is required" error); a folder with only
    tokenizer_config.json holds no vocabulary (was: transformers' multi-line ValueError)."""
    import sys

    folder = tmp_path / "t5-v1_1"
    folder.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (folder / f).write_bytes((t5_dir / f).read_bytes())
    with pytest.raises(ValueError, match=r"no tokenizer in .*t5-v1_1.*expected one of \['tokenizer.json'"):
        build_text_encoder(f"t5:{folder}")
    (folder / "spiece.model").write_bytes(b"\x0a\x05hello")  # read by sentencepiece only
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # not installed
    with pytest.raises(ValueError, match=r"SentencePiece model \(spiece.model\) without tokenizer.json .*"
                                         r"pip install sentencepiece"):
        build_text_encoder(f"t5:{folder}")


def test_long_prompts_are_cut_with_a_warning_naming_their_length(t5_dir, clip_dir):
    """A prompt longer than max_length is cut, as at extraction, and says so once, with its length in
    tokens (was: cut silently at sampling); prompts that fit say nothing."""
    long = " ".join(["a red circle moving left"] * 30)  # 150 words + EOS
    for spec, n in ((f"t5:{t5_dir}", 151), (f"clip:{clip_dir}", 152), ("builtin", len(long) + 2)):
        enc = build_text_encoder(spec)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            short, _ = enc.encode(["a red circle moving left"])
        with pytest.warns(UserWarning, match=rf"a caption or prompt of {n} tokens is cut to the text encoder's "
                                             rf"max_length {enc.max_length} \({re.escape(spec)}\): 'a red circle"):
            emb, mask = enc.encode(["up", long])
        assert mask[1].all() and mask[0].sum() < enc.max_length
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per encoder
            again, _ = enc.encode([long])
        torch.testing.assert_close(again[0], emb[1])


def test_full_checkpoints_sharded_and_half_load_their_encoder_in_float32_quietly(tmp_path, capfd):
    """A full T5 (encoder + decoder, as DeepFloyd/t5-v1_1-xxl) saved in float16 shards and a full CLIPModel
    (as openai/clip-vit-large-patch14) give their text encoder's output, in float32 (float16 matmuls do not
    run on every CPU), without transformers' table of the unused decoder / vision weights (was: one line
    per vision tensor, and a progress bar per load)."""
    from transformers import CLIPConfig, CLIPModel, T5Config, T5ForConditionalGeneration

    tok, vocab = tokenizer(None, "</s>", "<pad>")
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(
        vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, pad_token_id=vocab["<pad>"], eos_token_id=vocab["</s>"], decoder_start_token_id=0))
    t5.half().save_pretrained(tmp_path / "t5", max_shard_size="20KB")
    tok.save_pretrained(tmp_path / "t5")
    assert (tmp_path / "t5" / "model.safetensors.index.json").is_file()
    ctok, cv = tokenizer("<|startoftext|>", "<|endoftext|>", "<|endoftext|>")
    text = dict(vocab_size=len(cv), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=cv["<|startoftext|>"], eos_token_id=cv["<|endoftext|>"],
                pad_token_id=cv["<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=16)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    clip.save_pretrained(tmp_path / "clip")
    ctok.save_pretrained(tmp_path / "clip")
    capfd.readouterr()
    prompt = ["a red circle moving left"]
    for spec, tok_, ref in ((f"t5:{tmp_path / 't5'}", tok, t5.float().eval().encoder),
                            (f"clip:{tmp_path / 'clip'}", ctok, clip.text_model)):
        enc = build_text_encoder(spec)
        assert enc.model.dtype == torch.float32 and enc.dim == 32
        emb, mask = enc.encode(prompt)
        with torch.no_grad():
            want = ref(**tok_(prompt, return_tensors="pt")).last_hidden_state[0]
        torch.testing.assert_close(emb[0, :int(mask.sum())], want, atol=1e-5, rtol=1e-5)
    out = capfd.readouterr()
    assert "vision_model" not in out.out + out.err and "Loading weights" not in out.out + out.err


def test_recorded_spec_keeps_a_symlink_so_a_moved_folder_behind_it_is_found(t5_dir, tmp_path, monkeypatch):
    """The manifest records the path as given, links kept: a folder moved to another disk with its link
    re-pointed still loads and matches the fingerprint (was: the link's target was recorded, so sampling
    asked for the old place)."""
    import shutil

    from dit import Export, load_text_encoder
    from ldm.artifacts import AERecord, ClipSpec
    from ldm.text import absolute_spec, fingerprint

    real = tmp_path / "disk1" / "t5"
    shutil.copytree(t5_dir, real)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "t5").symlink_to(real, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    spec = absolute_spec("t5:models/../models/t5")
    assert spec == f"t5:{tmp_path / 'models' / 't5'}"
    export = Export(AERecord(name="kl2d-f8c4-debug", family="kl2d"), ClipSpec(8, 32, 32), {}, "grid",
                    text_encoder=spec, text_dim=32, text_fingerprint=fingerprint(build_text_encoder(spec)))
    moved = tmp_path / "disk2" / "t5"
    moved.parent.mkdir()
    real.rename(moved)
    (tmp_path / "models" / "t5").unlink()
    (tmp_path / "models" / "t5").symlink_to(moved, target_is_directory=True)
    assert load_text_encoder(export).dim == 32


def test_sentencepiece_only_t5_tokenizer_loads_when_the_package_is_there(t5_dir, tmp_path):
    """google/t5-v1_1-xxl's layout (spiece.model, no tokenizer.json) with sentencepiece installed tokenizes
    as the same vocabulary's tokenizer.json does."""
    from texts import WORDS

    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    proto = pb.ModelProto()
    for piece, score, kind in [("<pad>", 0.0, 3), ("</s>", 0.0, 3), ("<unk>", 0.0, 2)] + [
            ("\u2581" + w, -1.0 - i / 100, 1) for i, w in enumerate(WORDS)]:  # kinds: 1 normal, 2 unknown, 3 control
        p = proto.pieces.add()
        p.piece, p.score, p.type = piece, score, kind
    proto.trainer_spec.model_type = 1  # unigram
    spec = proto.trainer_spec
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 2, -1, 1, 0  # the ids of the pieces above
    folder = tmp_path / "t5-v1_1"
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        (folder / f).write_bytes((t5_dir / f).read_bytes())
    (folder / "spiece.model").write_bytes(proto.SerializeToString())
    prompts = ["a red circle moving left", "up"]
    emb, mask = build_text_encoder(f"t5:{folder}").encode(prompts)
    want, want_mask = build_text_encoder(f"t5:{t5_dir}").encode(prompts)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(emb, want)


def test_a_moved_text_encoder_is_given_with_its_new_spec_and_checked(t5_dir, tmp_path):
    """--text-encoder SPEC (`ldm sample`, `ldm eval gen`): the DiT's text encoder moved to another folder
    (no link left) is used when its width and fingerprint match (was: only "put that folder back"); the
    message of a missing folder names the flag; another model, another width or an export without a
    fingerprint are one-line errors."""
    import shutil

    from dit import Export, load_text_encoder
    from ldm.artifacts import AERecord, ClipSpec
    from ldm.errors import MissingInput, UserError
    from ldm.text import fingerprint

    old, new = tmp_path / "old" / "t5", tmp_path / "new" / "t5"
    shutil.copytree(t5_dir, old)
    export = Export(AERecord(name="kl2d-f8c4-debug", family="kl2d"), ClipSpec(8, 32, 32), {}, "grid",
                    text_encoder=f"t5:{old}", text_dim=32,
                    text_fingerprint=fingerprint(build_text_encoder(f"t5:{old}")))
    new.parent.mkdir()
    old.rename(new)
    with pytest.raises(MissingInput, match="put that folder back where it was, or give its new place with "
                                           "--text-encoder SPEC"):
        load_text_encoder(export)
    encoder = load_text_encoder(export, spec=f"t5:{new}")
    assert encoder.spec == f"t5:{new}" and encoder.dim == 32
    with pytest.raises(UserError, match=r"--text-encoder t5:.*other.* embeds a probe prompt differently .*not the "
                                        "model the DiT was trained with"):
        load_text_encoder(export, spec=f"t5:{save_t5(tmp_path / 'other', seed=1)}")
    with pytest.raises(UserError, match="--text-encoder builtin gives 256-d embeddings, the DiT was trained on 32-d"):
        load_text_encoder(export, spec="builtin")
    with pytest.raises(MissingInput, match="--text-encoder t5:nowhere cannot be loaded"):
        load_text_encoder(export, spec="t5:nowhere")
    with pytest.raises(UserError, match="records no fingerprint of its text encoder"):
        load_text_encoder(Export(**{**export.__dict__, "text_fingerprint": None}), spec=f"t5:{new}")
