"""Tiny local text-encoder folders the tests share (`test_text`, `test_binding`): word-level
tokenizers over a few words and random transformers models, saved as a user's download would be."""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = "a red blue green circle square triangle moving left right up down small big".split()


def tokenizer(bos: str | None, eos: str, pad: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in dict.fromkeys([pad, eos, bos, "<unk>"]) if t is not None]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = f"{bos} $A {eos}" if bos else f"$A {eos}"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, vocab[t]) for t in (bos, eos) if t])
    kw = dict(bos_token=bos) if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos,
                                   unk_token="<unk>", **kw), vocab


def save_t5(folder: Path, seed: int = 0, umt5: bool = False) -> Path:
    """A 2-layer, 32-wide T5 encoder (``umt5``: a UMT5 one, Wan's kind, with relative position
    biases in every layer) with random weights (``seed``) and its tokenizer in ``folder``."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config, model = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    tok, vocab = tokenizer(None, "</s>", "<pad>")
    torch.manual_seed(seed)
    cfg = config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 pad_token_id=vocab["<pad>"], eos_token_id=vocab["</s>"], decoder_start_token_id=0)
    model(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
