"""Log-probabilities name tokens by their text in context and give their own bytes (issue 18): with a
byte-level vocabulary a character's bytes can be split across tokens, and a token decoded alone showed
U+FFFD for each piece. The reference is the tokenizer's own decoding of the whole sequence."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from services.common.contracts import DecoderSpec
from services.dataset import tokenizer as dataset_tokenizer
from services.inference.generation import ServedVersion, TokenText

TEXT = "le café coûte 3 € — naïve ☃ snow"


def byte_level() -> ServedVersion:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["the cat sat on the mat. " * 50], trainer)  # no merge spans a non-ASCII byte
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    spec = DecoderSpec(n_layer=1, n_head=1, head_dim=8, vocab_size=len(fast), context_length=128,
                       eos_token_id=0, input_names=(), output_names=())
    return ServedVersion("m", 1, "m-v1", spec, fast)


def test_tokens_in_context_join_into_the_text_and_bytes_into_its_utf8():
    served = byte_level()
    ids = served.tokenizer.encode(TEXT, add_special_tokens=False)
    alone = [served.token_text(token) for token in ids]
    assert "\ufffd" in "".join(alone)  # decoded alone, the pieces of "€" and "☃" are garbage: not vacuous
    texts = TokenText(served)
    named = [texts.take(token) for token in ids]
    assert "".join(text for text, _ in named) == served.tokenizer.decode(ids) == TEXT
    assert b"".join(raw for _, raw in named) == TEXT.encode()
    assert any(text == "" for text, _ in named)  # a token holding the first bytes of a character
    assert "€" in [text for text, _ in named] and all(len(raw) == 1 for text, raw in named if text == "€")


def test_an_alternative_is_decoded_after_the_same_tokens_without_being_taken():
    served = byte_level()
    ids = served.tokenizer.encode("☃", add_special_tokens=False)
    assert len(ids) == 3  # three byte tokens
    texts = TokenText(served)
    texts.take(ids[0])
    texts.take(ids[1])
    assert texts.peek(ids[2]) == ("☃", "☃".encode()[2:])
    assert texts.peek(ids[2]) == texts.take(ids[2])  # peeking took nothing
    space = served.tokenizer.encode(" ", add_special_tokens=False)[0]
    assert texts.take(space) == (" ", b" ")


def test_special_tokens_and_other_vocabularies_keep_their_text():
    served = byte_level()
    eos = served.tokenizer.eos_token_id
    assert TokenText(served).take(eos) == ("<|endoftext|>", b"<|endoftext|>")
    chars = PreTrainedTokenizerFast(tokenizer_object=dataset_tokenizer.build_char("abcé \n"))
    spec = DecoderSpec(n_layer=1, n_head=1, head_dim=8, vocab_size=len(chars), context_length=16, eos_token_id=0,
                       input_names=(), output_names=())
    texts = TokenText(ServedVersion("c", 1, "c-v1", spec, chars))
    assert [texts.take(token) for token in chars.encode("bé a", add_special_tokens=False)] == \
        [("b", b"b"), ("é", "é".encode()), (" ", b" "), ("a", b"a")]
