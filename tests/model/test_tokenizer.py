"""The tiny SentencePiece tokenizer and the HF tokenizer built from it."""

from __future__ import annotations

import pytest
import sentencepiece as spm

from paligemma_xray.errors import CheckpointError
from paligemma_xray.model.tiny import TINY_BASE_VOCAB, TINY_VOCAB_SIZE, tiny_tokenizer
from paligemma_xray.model.tokenizer import (
    IMAGE_TOKEN,
    LOC_TOKENS,
    SEG_TOKENS,
    load_tokenizer,
    sentencepiece_size,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_path):
    return load_tokenizer(tiny_tokenizer_path)


def test_sentencepiece_layout_matches_the_real_one(tiny_tokenizer_path):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_path))
    assert sp.get_piece_size() == TINY_VOCAB_SIZE
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    # loc then seg pieces right after the base vocabulary, as 256000.. / 257024.. in the real one
    assert sp.piece_to_id("<loc0000>") == TINY_BASE_VOCAB
    assert sp.piece_to_id("<loc1023>") == TINY_BASE_VOCAB + 1023
    assert sp.piece_to_id("<seg000>") == TINY_BASE_VOCAB + 1024
    assert sp.piece_to_id("<seg127>") == TINY_VOCAB_SIZE - 1
    assert 500 <= TINY_BASE_VOCAB <= 1000


def test_every_loc_and_seg_token_is_one_id_at_the_expected_id(tokenizer):
    ids = tokenizer(LOC_TOKENS + SEG_TOKENS, add_special_tokens=False)["input_ids"]
    assert ids == [[TINY_BASE_VOCAB + i] for i in range(1024 + 128)]
    # also inside running text, glued to words and to each other
    text = "<loc0001><loc1023><seg005> fracture ; <loc0000>x"
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))
    assert pieces[:3] == ["<loc0001>", "<loc1023>", "<seg005>"]
    assert "<loc0000>" in pieces


def test_image_token_sits_after_the_text_vocabulary(tokenizer):
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == TINY_VOCAB_SIZE
    assert sentencepiece_size(tokenizer) == TINY_VOCAB_SIZE
    assert tokenizer.encode(IMAGE_TOKEN * 3, add_special_tokens=False) == [TINY_VOCAB_SIZE] * 3
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)


def test_encoding_equals_sentencepiece(tokenizer, tiny_tokenizer_path):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_path))
    for text in ["detect fracture\n", "caption en", "two  spaces, digits 123 and ünïcode", "<loc0010> wrist"]:
        assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tokenizer.decode(sp.encode(text)) == text


def test_newline_is_one_piece(tokenizer):
    assert len(tokenizer.encode("\n", add_special_tokens=False)) == 1


def test_tiny_tokenizer_accepts_a_folder(tmp_path):
    assert tiny_tokenizer(tmp_path) == tmp_path / "tokenizer.model"


def test_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_tokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00not a proto at all" * 10)
    with pytest.raises(CheckpointError, match=r"junk\.model"):
        load_tokenizer(junk)


def test_a_tokenizer_without_loc_pieces_is_refused(tmp_path):
    # A SentencePiece model with the same specials but no loc/seg pieces (a plain Gemma one).
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(tiny_tokenizer(tmp_path / "full.model").read_bytes())
    del proto.pieces[TINY_BASE_VOCAB:]
    plain = tmp_path / "plain.model"
    plain.write_bytes(proto.SerializeToString())
    with pytest.raises(CheckpointError, match=r"<loc0000>.*plain.model|plain.model.*<loc0000>"):
        load_tokenizer(plain)


def test_a_relative_tokenizer_path_never_asks_the_hub(tiny_tokenizer_path, monkeypatch):
    # "dir/tokenizer.model" also parses as a Hub repo id: transformers used to query the Hub
    # for it (about 30 s of retries offline) before reading the local file.
    import transformers.tokenization_utils_base as base

    def no_hub():
        raise AssertionError("the Hub was asked about a local tokenizer file")

    calls = []
    monkeypatch.setattr(base, "hf_api", lambda: calls.append(1) or no_hub())
    monkeypatch.chdir(tiny_tokenizer_path.parent.parent)
    relative = tiny_tokenizer_path.relative_to(tiny_tokenizer_path.parent.parent)
    assert len(load_tokenizer(relative)) == TINY_VOCAB_SIZE + 1
    assert calls == []
