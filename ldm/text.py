"""Text encoders behind one small interface: ``build_text_encoder(spec) -> TextEncoder``.

A spec names the encoder and is recorded in shard manifests next to cached embeddings:

| spec               | encoder                                                                  |
|--------------------|--------------------------------------------------------------------------|
| ``"builtin"``      | offline stand-in: byte tokenizer + small seeded frozen transformer       |
| ``"t5:<dir>"``     | transformers ``T5EncoderModel`` (``UMT5EncoderModel`` for a ``umt5``     |
|                    | folder, Wan's encoder) + tokenizer from a LOCAL directory                |
| ``"clip:<dir>"``   | transformers ``CLIPTextModel`` + tokenizer from a LOCAL directory        |

``<dir>`` is either a model directory (``config.json`` + weights + tokenizer files) or a
diffusers pipeline directory with ``text_encoder/`` and ``tokenizer/`` sub-folders. Nothing is
downloaded: a missing directory is an error that names it.

Every encoder is frozen (no gradients, always in eval mode) and returns
``(emb (B, L, D) float32, mask (B, L) bool)`` with ``L == max_length``; padding positions are
False in the mask and zero in ``emb``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.config import replace
from ldm.errors import UserError

T5_MAX_LENGTH = 120
UMT5_MAX_LENGTH = 512  # Wan 2.1 pads its UMT5 captions to 512 tokens
CLIP_MAX_LENGTH = 77


class TextEncoder(nn.Module):
    """Frozen text encoder: ``encode(prompts) -> (emb (B, L, D) float32, mask (B, L) bool)``."""

    def __init__(self, spec: str, dim: int, max_length: int) -> None:
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for special tokens), got {max_length}")
        self.spec = spec
        self.dim = dim
        self.max_length = max_length
        self.warned_cut = False  # a cut prompt is reported once per encoder

    def train(self, mode: bool = True) -> "TextEncoder":
        """Always stays in eval mode (frozen): a parent's ``.train()`` does not enable dropout."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        """Each prompt's length in tokens, special tokens included, before it is cut to ``max_length``."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Embed a batch of prompts: ``emb (B, L, D)`` float32 and ``mask (B, L)`` bool (True =
        real token). Padding positions are zero in ``emb``."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be strings, got {sorted(set(bad))}")
        if not self.warned_cut:
            counts = self.token_counts(prompts)
            cut = [i for i, n in enumerate(counts) if n > self.max_length]
            if cut:
                self.warned_cut = True
                text = prompts[cut[0]]
                warnings.warn(f"a caption or prompt of {counts[cut[0]]} tokens is cut to the text encoder's max_length "
                              f"{self.max_length} ({self.spec}): {text[:60]!r}{'...' if len(text) > 60 else ''}; "
                              "the rest of it is not seen (later cut ones are not reported)")
        emb, mask = self._encode(prompts)
        emb = emb.float() * mask[..., None]  # (B, L, D)
        return emb, mask

    def pool(self, emb: Tensor, mask: Tensor) -> Tensor:
        """One vector per prompt (B, D): the mean over real tokens."""
        w = mask.to(emb.dtype)[..., None]  # (B, L, 1)
        return (emb * w).sum(1) / w.sum(1).clamp(min=1.0)

    def describe(self) -> dict:
        """What a shard manifest records about the encoder that made its cached embeddings."""
        return {"spec": self.spec, "dim": self.dim, "max_length": self.max_length}


# --------------------------------------------------------------------------------------------
# transformers encoders (T5, CLIP) from a local directory
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_transformers():
    """transformers without its warnings and progress bars: what it would report (a full CLIP checkpoint's
    unused vision weights, a long prompt) is checked and reported here in one line."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _resolve_local_dirs(path: str, spec: str) -> tuple[Path, Path]:
    """(model dir, tokenizer dir) for a model dir or a diffusers pipeline dir."""
    root = Path(path).expanduser()
    if not path or not root.is_dir():
        raise FileNotFoundError(
            f"text encoder directory not found: {str(root)!r} (spec {spec!r}); text encoders are loaded "
            "from a local transformers directory only, never downloaded")
    if (root / "config.json").is_file():
        return root, root
    if (root / "text_encoder" / "config.json").is_file() and (root / "tokenizer").is_dir():
        return root / "text_encoder", root / "tokenizer"
    raise FileNotFoundError(
        f"no config.json in text encoder directory {str(root)!r} (spec {spec!r}); expected a "
        "transformers model directory or a pipeline directory with text_encoder/ and tokenizer/")


class HFTextEncoder(TextEncoder):
    """A transformers text model (T5 encoder or CLIP text tower); its last hidden state is the
    embedding. T5 v1.1 / Flan-T5 in float16 overflow: load them in float32 or bfloat16."""

    def __init__(self, spec: str, kind: str, model: nn.Module, tokenizer, max_length: int) -> None:
        super().__init__(spec, int(model.config.hidden_size if kind == "clip" else model.config.d_model),
                         max_length)
        self.kind = kind
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        with _quiet_transformers():  # its "longer than the specified maximum sequence length" warning
            ids = self.tokenizer(list(prompts), truncation=False)["input_ids"]
        return [len(i) for i in ids]

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        batch = self.tokenizer(prompts, padding="max_length", max_length=self.max_length,
                               truncation=True, return_tensors="pt")
        ids = batch["input_ids"].to(self.device)  # (B, L)
        mask = batch["attention_mask"].to(self.device).bool()  # (B, L)
        out = self.model(input_ids=ids, attention_mask=mask.long())
        return out.last_hidden_state, mask

    def pool(self, emb: Tensor, mask: Tensor) -> Tensor:
        """CLIP: the hidden state of the last real token (the end-of-text token, i.e. the text
        model's ``pooler_output``); T5: the mean over real tokens."""
        if self.kind != "clip":
            return super().pool(emb, mask)
        last = mask.long().sum(1).clamp(min=1) - 1  # (B,)
        return emb[torch.arange(emb.shape[0], device=emb.device), last]


# config.json model_type each kind loads (a full seq2seq T5 / a CLIP text+vision model hold the encoder)
HF_MODEL_TYPES = {"t5": ("t5", "mt5", "umt5"), "clip": ("clip", "clip_text_model")}
# a tokenizer's vocabulary (tokenizer_config.json alone holds none); a SentencePiece model without tokenizer.json
# needs the sentencepiece package to be read
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model", "vocab.json")
SENTENCEPIECE_FILES = ("spiece.model", "tokenizer.model")


def _check_hf_dirs(kind: str, path: str, model_dir: Path, tok_dir: Path, spec: str) -> str:
    """The folder holds a model of ``kind`` and a tokenizer: transformers would otherwise build the
    wrong class with random weights, or a tokenizer with an empty vocabulary, without an error.
    Returns its ``model_type``."""
    try:
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError):
        raise ValueError(f"{str(model_dir / 'config.json')!r} is not a JSON object (spec {spec!r})") from None
    if model_type not in HF_MODEL_TYPES[kind]:
        other = [k for k, types in HF_MODEL_TYPES.items() if model_type in types]
        what = f"a {model_type!r} model" if model_type else "no transformers model (config.json names no model_type)"
        hint = f": pass it as {other[0]}:{path}" if other else ""
        raise ValueError(f"text encoder directory {str(model_dir)!r} holds {what}, not a "
                         f"{kind.upper()} text encoder (spec {spec!r}){hint}")
    if not any((tok_dir / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"no tokenizer in {str(tok_dir)!r} (spec {spec!r}): expected one of {list(TOKENIZER_FILES)}; "
                         "copy the model's tokenizer files next to its config.json")
    sp = [f for f in SENTENCEPIECE_FILES if (tok_dir / f).is_file()]
    if sp and not (tok_dir / "tokenizer.json").is_file() and not _has_sentencepiece():
        raise ValueError(f"the tokenizer in {str(tok_dir)!r} is a SentencePiece model ({sp[0]}) without tokenizer.json "
                         f"(spec {spec!r}): install the sentencepiece package (pip install sentencepiece) or copy "
                         "the model's tokenizer.json next to it")
    return model_type


def _has_sentencepiece() -> bool:
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return False
    return True


def _load_hf(kind: str, path: str, spec: str, max_length: int | None,
             dtype: torch.dtype | None) -> HFTextEncoder:
    model_dir, tok_dir = _resolve_local_dirs(path, spec)
    model_type = _check_hf_dirs(kind, path, model_dir, tok_dir, spec)
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel, UMT5EncoderModel

    # UMT5 (Wan's encoder) has relative position biases in every layer: T5EncoderModel would load it
    # without them, silently wrong
    cls = {"umt5": UMT5EncoderModel, "clip": CLIPTextModel, "clip_text_model": CLIPTextModel}.get(model_type,
                                                                                                   T5EncoderModel)
    try:
        with _quiet_transformers():  # a full T5 / CLIP checkpoint's unused decoder / vision weights: a long table
            model, info = cls.from_pretrained(model_dir, local_files_only=True, dtype=dtype or torch.float32,
                                              output_loading_info=True)
    except OSError as e:  # no weights file
        raise FileNotFoundError(f"text encoder {spec!r}: {str(e).splitlines()[0]}") from None
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(f"text encoder {spec!r}: the weights in {str(model_dir)!r} lack {len(missing)} tensor(s) of a "
                         f"{cls.__name__} ({missing[:3]} ...): not this model's weights")
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except (ValueError, OSError, ImportError, KeyError) as e:  # transformers' own are several lines long
        raise ValueError(f"the tokenizer in {str(tok_dir)!r} cannot be loaded (spec {spec!r}): "
                         f"{str(e).strip().splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        raise ValueError(f"the tokenizer in {str(tok_dir)!r} has no pad token (spec {spec!r})")
    if max_length is None:
        max_length = UMT5_MAX_LENGTH if model_type == "umt5" else T5_MAX_LENGTH if kind == "t5" else CLIP_MAX_LENGTH
    if kind == "clip" and max_length > model.config.max_position_embeddings:
        raise ValueError(f"max_length {max_length} exceeds the CLIP model's "
                         f"{model.config.max_position_embeddings} positions (spec {spec!r})")
    return HFTextEncoder(spec, kind, model, tokenizer, max_length)


# --------------------------------------------------------------------------------------------
# builtin: the offline stand-in
# --------------------------------------------------------------------------------------------

PAD, BOS, EOS = 0, 1, 2
BYTE_OFFSET = 3  # byte b has token id b + 3
BYTE_VOCAB = 256 + BYTE_OFFSET


@dataclass(frozen=True)
class BuiltinTextConfig:
    dim: int = 256
    layers: int = 2
    heads: int = 4
    mlp_hidden: int = 512
    max_length: int = 64
    word_buckets: int = 4096
    word_gain: float = 1.0      # weight of the hashed whole-word vector on each byte of a word
    byte_gain: float = 0.5      # weight of the byte identity
    pos_gain: float = 0.5       # weight of the sinusoidal position
    residual_gain: float = 0.5  # scale of each (random) attention / MLP branch
    seed: int = 0


def _seeded_uniform(seed: int, name: str, shape: tuple[int, ...], bound: float) -> Tensor:
    """Weights uniform in [-bound, bound) from a counter-based generator (splitmix64 over
    ``sha256(seed:name)`` + index), so they are bit-identical on every machine, process and
    torch version (unlike ``torch.randn``, whose CPU kernels differ with the instruction set)."""
    key = np.uint64(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little"))
    n = math.prod(shape)
    with np.errstate(over="ignore"):
        z = key + (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)  # exact 24-bit uniforms in [0, 1)
    w = ((2.0 * u - 1.0) * bound).astype(np.float32)
    return torch.from_numpy(w.reshape(shape))


def _sinusoidal(length: int, dim: int) -> Tensor:
    """Fixed sinusoidal positions (Vaswani et al. 2017, Sec. 3.5), computed in float64."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    freq = np.exp(-math.log(10000.0) * np.arange(0, dim, 2, dtype=np.float64) / dim)[None]
    pe = np.zeros((length, dim), dtype=np.float64)
    pe[:, 0::2] = np.sin(pos * freq)
    pe[:, 1::2] = np.cos(pos * freq)
    return torch.from_numpy(pe.astype(np.float32))


def _is_word_byte(b: int) -> bool:
    return b >= 128 or chr(b).isalnum()


def _word_hashes(word: bytes, buckets: int) -> tuple[int, int]:
    """Two independent bucket indices for a lower-cased word (collisions of both are rare)."""
    return zlib.crc32(word) % buckets, zlib.crc32(b"#" + word) % buckets


class BuiltinTextEncoder(TextEncoder):
    """An OFFLINE STAND-IN for a real text encoder: no download, no training, not semantic.

    Tokenizer: the UTF-8 bytes of the prompt between BOS and EOS, right-padded with PAD to
    ``max_length`` (longer prompts are cut). Each byte token's input vector is the sum of
    (a) a byte embedding, (b) a hashed embedding of the whole (lower-cased) word the byte belongs
    to, the same on every byte of that word, and (c) a sinusoidal position. Two pre-norm
    transformer layers with random weights and down-scaled residual branches then mix in context,
    and a final parameter-free LayerNorm sets the scale.

    All weights come from a fixed seed through a counter-based generator and are frozen, so the
    embeddings are deterministic and identical across processes and machines, distinct for
    distinct prompts, and words stay recognisable wherever they occur ("red" looks like "red" in
    any caption), which lets a DiT read short attribute captions such as
    "a red circle moving left" through cross-attention. It knows nothing about meaning: "red" is
    no closer to "crimson" than to "left". Use ``t5:<dir>`` or ``clip:<dir>`` for real models.
    """

    def __init__(self, cfg: BuiltinTextConfig = BuiltinTextConfig(), spec: str = "builtin") -> None:
        super().__init__(spec, cfg.dim, cfg.max_length)
        if cfg.dim % cfg.heads or cfg.dim % 2:
            raise ValueError(f"builtin text encoder: dim {cfg.dim} must be even and divisible by "
                             f"heads {cfg.heads}")
        self.cfg = cfg
        d, s = cfg.dim, cfg.seed
        unit = math.sqrt(3.0)  # uniform bound for unit variance

        def weight(name: str, shape: tuple[int, ...], bound: float) -> nn.Parameter:
            return nn.Parameter(_seeded_uniform(s, name, shape, bound), requires_grad=False)

        self.byte_embed = weight("byte_embed", (BYTE_VOCAB, d), unit)
        self.word_embed = weight("word_embed", (cfg.word_buckets, d), unit)
        self.layers = nn.ModuleList()
        for i in range(cfg.layers):
            layer = nn.Module()
            layer.qkv = weight(f"layers.{i}.qkv", (3 * d, d), math.sqrt(3.0 / d))
            layer.proj = weight(f"layers.{i}.proj", (d, d), math.sqrt(3.0 / d))
            layer.fc1 = weight(f"layers.{i}.fc1", (cfg.mlp_hidden, d), math.sqrt(3.0 / d))
            layer.fc2 = weight(f"layers.{i}.fc2", (d, cfg.mlp_hidden), math.sqrt(3.0 / cfg.mlp_hidden))
            self.layers.append(layer)
        self.register_buffer("pos", _sinusoidal(cfg.max_length, d), persistent=False)
        self.eval()

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        return [len(p.encode("utf-8")) + 2 for p in prompts]  # BOS + bytes + EOS

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """``ids (B, L)`` byte tokens, ``words (B, L, 2)`` hashed word buckets (-1 = not in a
        word), ``mask (B, L)`` bool."""
        B, L = len(prompts), self.max_length
        ids = torch.full((B, L), PAD, dtype=torch.long)
        words = torch.full((B, L, 2), -1, dtype=torch.long)
        for b, text in enumerate(prompts):
            data = text.encode("utf-8")[: L - 2]
            ids[b, 0] = BOS
            ids[b, 1:len(data) + 1] = torch.tensor(list(data), dtype=torch.long) + BYTE_OFFSET
            ids[b, len(data) + 1] = EOS
            start = None
            for j in range(len(data) + 1):
                inside = j < len(data) and _is_word_byte(data[j])
                if inside and start is None:
                    start = j
                elif not inside and start is not None:
                    h = _word_hashes(data[start:j].lower(), self.cfg.word_buckets)
                    words[b, start + 1:j + 1] = torch.tensor(h)
                    start = None
        return ids, words, ids != PAD

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        cfg, dev = self.cfg, self.device
        ids, words, mask = (t.to(dev) for t in self.tokenize(prompts))
        in_word = (words[..., :1] >= 0).float()  # (B, L, 1)
        word_vec = self.word_embed[words.clamp(min=0)].sum(2) / math.sqrt(2.0)  # (B, L, D)
        x = (cfg.byte_gain * self.byte_embed[ids] + cfg.word_gain * in_word * word_vec
             + cfg.pos_gain * self.pos[None])  # (B, L, D)
        B, L, D = x.shape
        key_mask = mask[:, None, None, :]  # (B, 1, 1, L)
        for layer in self.layers:
            h = F.layer_norm(x, (D,))
            q, k, v = F.linear(h, layer.qkv).view(B, L, 3, cfg.heads, D // cfg.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, H, L, D/H)
            a = a.transpose(1, 2).reshape(B, L, D)  # (B, L, D)
            x = x + cfg.residual_gain * F.linear(a, layer.proj)
            h = F.layer_norm(x, (D,))
            x = x + cfg.residual_gain * F.linear(F.gelu(F.linear(h, layer.fc1)), layer.fc2)
        return F.layer_norm(x, (D,)), mask


# --------------------------------------------------------------------------------------------

FINGERPRINT_PROMPT = "a red circle moving left"
FINGERPRINT_DIMS = 16


def fingerprint(encoder: TextEncoder) -> tuple[float, ...]:
    """What identifies an encoder's weights and tokenizer in a manifest, in a few numbers: the first
    ``FINGERPRINT_DIMS`` values of the pooled embedding of a fixed prompt."""
    emb, mask = encoder.encode([FINGERPRINT_PROMPT])
    return tuple(round(float(v), 5) for v in encoder.pool(emb, mask)[0, :FINGERPRINT_DIMS].cpu())


def same_fingerprint(a: Sequence[float], b: Sequence[float], min_cosine: float = 0.99) -> bool:
    """Two fingerprints of the same encoder (up to device and precision): cosine >= ``min_cosine``;
    another model's are unrelated vectors."""
    if len(a) != len(b):
        return False
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return bool(F.cosine_similarity(x, y, dim=0) >= min_cosine)


def absolute_spec(spec: str) -> str:
    """``spec`` with its folder as an absolute path (``t5:models/x`` -> ``t5:/home/.../models/x``),
    as a manifest records it so that other working directories find the same folder. Symbolic links are
    kept: a ``/models/t5`` link re-pointed at the folder's new place still finds it."""
    kind, sep, arg = spec.partition(":")
    if kind in ("t5", "clip") and sep and arg:
        return f"{kind}:{os.path.abspath(Path(arg).expanduser())}"
    return spec


def check_text_max_length(length: int, encoder: str | None, flag: str = "--text-max-length") -> None:
    """A ``--text-max-length`` setting (0: the encoder's own): 2 tokens or more, and only with a text encoder."""
    if length < 0 or length == 1:
        raise UserError(f"{flag} must be >= 2 tokens (room for the special ones), or 0 for the text encoder's own, "
                        f"got {length}")
    if length and not encoder:
        raise UserError(f"{flag} {length} is the length of caption embeddings: give --text-encoder too")


def build_text_encoder(spec: str, *, max_length: int | None = None,
                       device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> TextEncoder:
    """Build the encoder a spec names: ``"builtin"``, ``"t5:<local dir>"`` or ``"clip:<local dir>"``.

    ``max_length`` overrides the token length (defaults: T5 120, CLIP 77, builtin 64);
    ``dtype`` is the weight dtype of transformers models (default float32; outputs are always
    float32). The result is frozen and in eval mode.
    """
    if not isinstance(spec, str):
        raise TypeError(f"text encoder spec must be a string, got {type(spec).__name__}")
    kind, sep, arg = spec.partition(":")
    if kind == "builtin" and not sep:
        cfg = BuiltinTextConfig()
        if max_length is not None:
            cfg = replace(cfg, max_length=max_length)
        enc: TextEncoder = BuiltinTextEncoder(cfg, spec)
    elif kind in ("t5", "clip") and sep:
        enc = _load_hf(kind, arg, spec, max_length, dtype)
    else:
        raise ValueError(f"unknown text encoder spec {spec!r}; expected 'builtin', "
                         "'t5:<local dir>' or 'clip:<local dir>'")
    return enc.to(device) if device is not None else enc
