"""The PaliGemma tokenizer, built from big_vision's SentencePiece ``.model`` file.

The SentencePiece model holds Gemma's text pieces followed by ``<loc0000>``..``<loc1023>`` and
``<seg000>``..``<seg127>`` (257152 pieces in the real one). Hugging Face adds ``<image>`` as a
special token right after that vocabulary (id 257152), outside the text vocabulary, so the
model never predicts it.

Example:

>>> from paligemma_xray.model.tiny import tiny_tokenizer
>>> import tempfile
>>> tok = load_tokenizer(tiny_tokenizer(tempfile.mkdtemp()))
>>> tok.convert_tokens_to_ids("<image>") == sentencepiece_size(tok)
True
>>> len(tok.encode("<loc0012>", add_special_tokens=False))
1
"""

from __future__ import annotations

from pathlib import Path

from transformers import AddedToken, GemmaTokenizer, PreTrainedTokenizerBase

from paligemma_xray.errors import CheckpointError
from paligemma_xray.locations import LOC_BINS, SEG_CODES, loc_token, seg_token

IMAGE_TOKEN = "<image>"
LOC_TOKENS = [loc_token(i) for i in range(LOC_BINS)]
SEG_TOKENS = [seg_token(i) for i in range(SEG_CODES)]


def load_tokenizer(spm_path: str | Path) -> PreTrainedTokenizerBase:
    """A Gemma tokenizer from a SentencePiece ``.model`` file, with ``<image>`` added.

    The loc/seg pieces must already be in the file (they are in ``paligemma_tokenizer.model``);
    they are checked to encode to one id each, a check that caught a tokenizer once splitting
    ``<loc0000>`` into characters. BOS/EOS are not added automatically: prompts are built
    explicitly by :mod:`paligemma_xray.model.processing`.
    """
    path = Path(spm_path)
    if not path.is_file():
        raise CheckpointError("SentencePiece tokenizer file not found", path=path)
    tokenizer = _gemma_from_sentencepiece(path)
    base = len(tokenizer)
    if tokenizer.bos_token_id != 2 or tokenizer.eos_token_id != 1 or tokenizer.pad_token_id != 0:
        raise CheckpointError(
            "expected Gemma's special ids pad 0, eos 1, bos 2; got "
            f"pad {tokenizer.pad_token_id}, eos {tokenizer.eos_token_id}, bos {tokenizer.bos_token_id}",
            path=path,
        )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(IMAGE_TOKEN, normalized=False, special=True)]}
    )
    tokenizer.add_bos_token = False
    tokenizer.add_eos_token = False
    # Where the SentencePiece model came from: save_hf copies it beside the HF files so
    # that an HF folder can still be written back to big_vision with its tokenizer.
    tokenizer.spm_path = str(path.resolve())
    check_location_tokens(tokenizer, path=path)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id != base:
        raise CheckpointError(f"<image> got id {image_id}, expected {base} (after the vocabulary)", path=path)
    return tokenizer


def _gemma_from_sentencepiece(path: Path) -> PreTrainedTokenizerBase:
    """Build the tokenizer from the file alone, with transformers' own SentencePiece converter.

    Not ``GemmaTokenizer.from_pretrained(file)``: in transformers 5.x a vocabulary of more than
    100,000 pieces (the real one: 257,152) makes its constructor look for a ``config.json``
    of the "repo" it came from (``_patch_mistral_regex``), and a file path is no repo, so
    the real tokenizer failed as "Unable to load vocabulary" while the tiny test one
    passed. Built here from the converted vocabulary/merges with no name to look up, the
    constructor has nothing to ask a Hub or a folder about, whatever the size.
    """
    try:
        import sentencepiece as spm

        # sentencepiece's own parser first: it tells a foreign or corrupt file in one line.
        spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"not a SentencePiece model ({reason})", path=path) from error
    try:
        kwargs = GemmaTokenizer.convert_to_native_format(vocab_file=str(path))
        return GemmaTokenizer(**kwargs)
    except Exception as error:  # valid SentencePiece, but not a tokenizer transformers can build
        reason = " ".join(str(error).split()) or type(error).__name__  # one line
        raise CheckpointError(
            f"cannot build a Gemma tokenizer from this SentencePiece model: {reason}", path=path
        ) from error


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of one token (transformers' ``convert_tokens_to_ids`` also takes lists)."""
    found = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(found, int):
        raise TypeError(f"{token!r} gave {found!r}, not one id")
    return found


def sentencepiece_size(tokenizer: PreTrainedTokenizerBase) -> int:
    """Size of the text vocabulary: ids below it are SentencePiece pieces (257152 for the real one)."""
    return token_id(tokenizer, IMAGE_TOKEN)


def check_location_tokens(tokenizer: PreTrainedTokenizerBase, path: str | Path | None = None) -> None:
    """Raise :class:`CheckpointError` unless every loc/seg token is one id, loc then seg, contiguous."""
    first = token_id(tokenizer, LOC_TOKENS[0])
    expected = list(range(first, first + len(LOC_TOKENS) + len(SEG_TOKENS)))
    encoded = tokenizer(LOC_TOKENS + SEG_TOKENS, add_special_tokens=False)["input_ids"]
    for token, ids, want in zip(LOC_TOKENS + SEG_TOKENS, encoded, expected):
        if ids != [want]:
            raise CheckpointError(
                f"{token} encodes to {ids}, expected the single id {want}; "
                "this is not a PaliGemma tokenizer (loc/seg pieces missing or split)",
                path=path,
            )
