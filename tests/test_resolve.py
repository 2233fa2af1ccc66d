""""Which autoencoder" has one answer (``autoencoders.resolve``): registered names, our saved
folders, sources such as diffusers; the record a manifest / export keeps rebuilds the same model;
typed, versioned artifacts; capabilities declared on the class."""
from __future__ import annotations

import json

import pytest
import torch

import autoencoders
from autoencoders import config_of, record_of, resolve, resolve_record
from data.manifest import Manifest
from dit import Export
from ldm import config as cfglib
from ldm.artifacts import AERecord
from ldm.checkpoint import dir_hash

NAME = "kl2d-f8c4-debug"


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_registered_name_saved_folder_and_errors(tmp_path):
    with pytest.warns(UserWarning, match="RANDOM weights"):
        a = resolve(NAME, seed=3)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        b = resolve(NAME, seed=3)
    assert a.name == NAME and a.weights_hash is None and _same(a.model, b.model)  # seeded
    a.model.save_pretrained(tmp_path / "ae", name=NAME)
    for found in (resolve(checkpoint=tmp_path / "ae"), resolve(str(tmp_path / "ae")), resolve(NAME, tmp_path / "ae")):
        assert found.name == NAME and found.weights_hash == dir_hash(tmp_path / "ae") and _same(found.model, a.model)
    with pytest.raises(ValueError, match="holds 'kl2d-f8c4-debug', not 'causal3d"):
        resolve("causal3d-f4x8c4-debug", tmp_path / "ae")
    a.model.save_pretrained(tmp_path / "converted")  # `ldm convert --target kl2d`: no name, the family only
    assert resolve("kl2d", tmp_path / "converted").name == "kl2d"
    for wrong in ("causal3d-f4x8c4-debug", "hivae-s-debug"):
        with pytest.raises(ValueError, match=f"holds a 'kl2d' model, not '{wrong}'"):
            resolve(wrong, tmp_path / "converted")
    # a family's name takes any folder of the family (a recipe's `autoencoder: mtcvae`), and no other
    assert resolve("kl2d", tmp_path / "ae").name == NAME
    for folder, message in (("converted", "holds a 'kl2d' model, not a 'causal3d' one"),
                            ("ae", f"holds a 'kl2d' model \\('{NAME}'\\), not a 'hivae' one")):
        with pytest.raises(ValueError, match=message):
            resolve("causal3d" if folder == "converted" else "hivae", tmp_path / folder)
    with pytest.raises(KeyError, match="not registered"):
        resolve("kl2d-nope", tmp_path / "converted")
    with pytest.raises(ValueError, match="do not apply to a saved model"):
        resolve(None, tmp_path / "ae", overrides={"latent_channels": 8})
    with pytest.raises(FileNotFoundError, match="not found .expected a folder with config.json"):
        resolve(None, tmp_path / "missing")
    with pytest.raises(KeyError, match="not registered"):
        resolve("kl2d-nope")
    with pytest.raises(ValueError, match="give --autoencoder"):
        resolve()
    with pytest.raises(ValueError, match="local copy"):
        resolve("diffusers:AutoencoderKL")
    assert "diffusers" in autoencoders.LOADERS
    with pytest.raises(ValueError, match="not the ones the latents were extracted with"):
        resolve(None, tmp_path / "ae", expect_hash="0" * 16)
    # config_of reads config.json only: no weights needed (costs, labels)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text((tmp_path / "ae" / "config.json").read_text())
    cls, config = config_of(str(tmp_path / "cfg"))
    assert cls.family == "kl2d" and config == a.model.config and config_of(NAME)[1] == config


def test_record_rebuilds_the_model_and_checks_the_weights(tmp_path):
    torch.manual_seed(0)
    ae = autoencoders.build(NAME)
    ae.save_pretrained(tmp_path / "ae", name=NAME)
    found = resolve(None, tmp_path / "ae")
    record = record_of(found, tmp_path / "ae")
    assert record.checkpoint == str((tmp_path / "ae").resolve()) and record.config_hash == cfglib.config_hash(ae.config)
    assert _same(resolve_record(record).model, ae)
    moved = tmp_path / "moved"
    (tmp_path / "ae").rename(moved)
    with pytest.raises(FileNotFoundError, match="--ae-checkpoint"):
        resolve_record(record)
    assert _same(resolve_record(record, moved).model, ae)  # --ae-checkpoint: another path, same hash
    autoencoders.build(NAME).save_pretrained(tmp_path / "other", name=NAME)
    with pytest.raises(ValueError, match="not the ones the latents were extracted with"):
        resolve_record(record, tmp_path / "other")
    # weights in a pipeline's subfolder: --ae-checkpoint takes the moved pipeline or its vae/ itself
    ae.save_pretrained(tmp_path / "pipe" / "vae", name=NAME)
    record = record_of(resolve(None, tmp_path / "pipe", subfolder="vae"), tmp_path / "pipe", "vae")
    (tmp_path / "pipe").rename(tmp_path / "pipe2")
    for given in (tmp_path / "pipe2", tmp_path / "pipe2" / "vae"):
        assert _same(resolve_record(record, given).model, ae)
    with pytest.raises(FileNotFoundError, match=r"--ae-checkpoint .*nowhere \(\+ the recorded subfolder vae\)"):
        resolve_record(record, tmp_path / "nowhere")
    with pytest.warns(UserWarning):
        random = resolve(NAME, seed=5)
    with pytest.warns(UserWarning, match="RANDOM autoencoder"):
        again = resolve_record(record_of(random, seed=5))
    assert _same(again.model, random.model)


def _v1_manifest() -> dict:
    """A manifest as version-1 ``ldm extract`` wrote it (flat autoencoder keys, no version)."""
    return {"autoencoder": "diffusers:AutoencoderKL", "config_hash": "abc", "checkpoint_hash": "def",
            "family": "diffusers", "config": {"class_name": "AutoencoderKL"}, "checkpoint": None, "seed": 0,
            "ae_path": "/models/sd", "ae_subfolder": "vae",
            "video": {"frames": 8, "height": 32, "width": 32, "fps": None},
            "text_encoder": "builtin", "shard_size": 4, "dtype": "fp32",
            "latent_spec": {"latent_shape": {"z": [4, 8, 4, 4]}}, "form": "grid",
            "counts": {"inputs": 2, "written": 2, "skipped": 0},
            "stats": {"z": {"count": 1, "mean": [0.0] * 4, "std": [1.0] * 4, "sample_std": [1.0] * 4}},
            "skipped": [], "shards": [{"name": "shard-000000.tar", "count": 2}], "text_dim": 256, "text_tokens": 5,
            "world_size": 1, "num_classes": 3, "input_problems": []}


def test_versioned_artifacts_migrate_and_stay_strict():
    m = Manifest.from_dict(_v1_manifest())
    assert m.version == 2 and m.counts.written == 2 and m.parts == {"z": (4, 8, 4, 4)}
    assert m.autoencoder == AERecord(name="diffusers:AutoencoderKL", family="diffusers",
                                     config={"class_name": "AutoencoderKL"}, config_hash="abc",
                                     checkpoint="/models/sd", subfolder="vae", checkpoint_hash="def", seed=0)
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m  # v2 round trip
    with pytest.raises(ValueError, match="unknown key"):
        Manifest.from_dict({**m.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="format version 3"):
        Manifest.from_dict({**m.to_dict(), "version": 3})
    keep = ("autoencoder", "family", "config", "config_hash", "checkpoint", "checkpoint_hash", "seed", "ae_path",
            "ae_subfolder", "video", "latent_spec", "form", "stats", "text_encoder", "text_dim", "text_tokens",
            "num_classes")
    v1_export = {**{k: _v1_manifest()[k] for k in keep}, "latent_norm": {"z": {"mean": [0.0], "std": [2.0]}}}
    e = Export.from_dict(v1_export)
    assert e.autoencoder == m.autoencoder and e.video == m.video and e.latent_norm["z"]["std"] == [2.0]


def test_capabilities_are_declared_not_probed():
    kl = autoencoders.build(NAME)
    assert (kl.stages, kl.base_family, kl.content_encoding, kl.variable_rate, kl.stage) == ((), "", False, False, None)
    with pytest.raises(ValueError, match="not trained in stages; --stage applies to hivae, mtcvae"):
        kl.with_stage(1)
    with pytest.raises(ValueError, match="no frozen base autoencoder"):
        kl.load_base("anywhere")
    with pytest.raises(ValueError, match="content"):
        kl.encode_content(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="variable-rate"):
        kl.varlen_length(17, 8.0)
    assert kl.last_layer() is [p for p in kl.decoder.parameters() if p.ndim > 1][-1]
    hivae = autoencoders.REGISTRY["hivae-s-debug"][0]
    assert (hivae.stages, hivae.base_family, hivae.content_encoding) == ((1, 2), "kl2d", True)


def test_weight_sources_convert_through_the_resolver(tmp_path, monkeypatch):
    """A weight source of ``autoencoders.sources`` (released weights, as ``ldm convert`` reads them)
    is a reference too: converted on the fly, its file's hash recorded, rebuilt from the record."""
    from autoencoders import sources
    from ldm.checkpoint import file_sha256, load_tensors

    torch.manual_seed(0)
    ae = autoencoders.build(NAME)
    ae.save_pretrained(tmp_path / "ae", name=NAME)
    released = tmp_path / "ae" / "model.safetensors"

    def stand_in(path, target):  # a converter reading a plain state dict file into kl2d
        model = autoencoders.build(NAME)
        model.load_state_dict(load_tensors(path))
        return sources.Conversion(model, NAME)

    monkeypatch.setitem(sources.SOURCES, "test-released", sources.Source("test-released", "kl2d", "a file", stand_in))
    found = resolve("test-released", released)
    assert found.name == "test-released" and found.weights_hash == file_sha256(released)[:16] and _same(found.model, ae)
    assert _same(resolve_record(record_of(found, released)).model, ae)
    with pytest.raises(ValueError, match="local copy"):
        resolve("test-released")
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve("test-released", tmp_path / "missing.pth")


def test_the_random_weights_warning_is_said_by_the_first_rank_only(monkeypatch, recwarn):
    """Every rank resolves the autoencoder: the warning came once per rank (8 lines on a node of 8 GPUs)."""
    for k in ("RANK", "SLURM_PROCID", "SLURM_STEP_ID"):  # an in-process `ldm train` before sets RANK=0 here
        monkeypatch.delenv(k, raising=False)
    record = record_of(resolve(NAME, seed=5, warn_random=False), seed=5)
    for env in ({"RANK": "1"}, {"SLURM_PROCID": "3", "SLURM_STEP_ID": "0"}):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            resolve(NAME, seed=5)
            resolve_record(record)
    assert not [w for w in recwarn if "RANDOM" in str(w.message)]
    for env in ({"RANK": "0"}, {"SLURM_PROCID": "3"}):  # rank 0; an sbatch script's shell (no srun step)
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            with pytest.warns(UserWarning, match="RANDOM weights"):
                resolve(NAME, seed=5)
            with pytest.warns(UserWarning, match="RANDOM autoencoder"):
                resolve_record(record)
