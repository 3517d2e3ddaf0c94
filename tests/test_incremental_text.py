"""Streaming with a Llama-style SentencePiece tokenizer (built offline with `tokenizers`: "▁" word
prefixes, byte fallback for characters outside the vocabulary): the streamed text equals the
tokenizer's own decode of the whole sequence, and no piece ever shows half a character."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import PreTrainedTokenizerFast

from capa_export.runtime import IncrementalText

SENTENCES = ["the quick brown fox jumps over the lazy dog", "hello world, the world is wide",
             "a picture of a red car"]


@pytest.fixture(scope="module")
def llama_style():
    """A BPE over "▁"-prefixed text trained on a few sentences, with <0xNN> byte tokens for the rest
    (the layout of Llama's tokenizer.json: Prepend/Replace normaliser, ByteFallback + Fuse decoder)."""
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizer
    trained.train_from_iterator(SENTENCES * 20, trainers.BpeTrainer(vocab_size=200,
                                                                    special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(trained.to_str())["model"]
    vocab = dict(spec["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizer
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("text", ["the world is wide: héllo wörld 日本 🙂 fox", "über 🙂🙂 ok", "the quick fox, über the lazy dog"])
def test_streamed_text_is_the_whole_decode(llama_style, text):
    ids = llama_style.encode(text, add_special_tokens=False) + [llama_style.eos_token_id]
    pieces = llama_style.convert_ids_to_tokens(ids)
    assert any(p.startswith("<0x") for p in pieces)  # byte fallback is exercised
    assert any("▁" in p for p in pieces)
    emitted = []
    stream = IncrementalText(llama_style, emitted.append)
    for token in ids:
        stream.add(token)
    stream.end()
    reference = llama_style.decode(ids, skip_special_tokens=True)
    assert "".join(emitted) == reference == text
    assert all("\ufffd" not in piece for piece in emitted)
    # decoding tokens one at a time (what streaming did before) loses the spaces: the test can fail
    assert "".join(llama_style.decode([t], skip_special_tokens=True) for t in ids) != reference
