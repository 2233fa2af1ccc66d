"""Floor 2: the video DiT over typed token groups, latent<->token adapters, DiT registry, exports."""
from dit.config import DiTConfig
from dit.export import Export, load_export, load_text_encoder, save_export
from dit.model import VideoDiT
from dit.registry import REGISTRY, build, describe, load_pretrained, make_config, save_pretrained
from dit.tokens import PartSpec, Tokens, detokenize, packing, part_specs, tokenize

__all__ = ["VideoDiT", "DiTConfig", "REGISTRY", "build", "make_config", "describe", "save_pretrained",
           "load_pretrained", "Export", "load_export", "load_text_encoder", "save_export", "PartSpec", "Tokens",
           "part_specs", "tokenize", "detokenize", "packing"]
