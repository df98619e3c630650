"""Option rules and the canonical form the content address hashes."""

import pytest

from services.common.errors import ValidationFailed
from services.dataset.options import DatasetOptions, Fractions, parse_s3_uri


def test_defaults_are_valid():
    assert DatasetOptions(name="shakespeare-1.0").validated().vocab_size == 8192


@pytest.mark.parametrize("changes, message", [
    ({"name": "Bad Name"}, "dataset name"),
    ({"format": "csv"}, "format must be one of"),
    ({"tokenizer": "wordpiece"}, "tokenizer must be one of"),
    ({"vocab_size": 100}, "vocab_size must be between"),
    ({"fractions": Fractions(0.5, 0.5, 0.5, 0.0)}, "sum to 1"),
    ({"fractions": Fractions(0.0, 1.0, 0.0, 0.0)}, "train > 0"),
    ({"min_doc_chars": 10, "max_doc_chars": 5}, "max_doc_chars"),
    ({"near_dup_threshold": 0.0}, "near_dup_threshold"),
    ({"source_uri": "http://x/y"}, "s3://"),
    ({"tokenizer": "model"}, "tokenizer=model needs tokenizer_model"),
    ({"tokenizer": "model", "tokenizer_model": "base"}, "tokenizer_model_version"),
    ({"tokenizer": "model", "tokenizer_model": "Base!", "tokenizer_model_version": 1}, "tokenizer_model"),
    ({"tokenizer_model": "base", "tokenizer_model_version": 1}, "go with tokenizer=model, not tokenizer=bpe"),
])
def test_broken_rules_are_named(changes, message):
    with pytest.raises(ValidationFailed, match=message):
        DatasetOptions(**{"name": "d", **changes}).validated()


def test_canonical_ignores_name_source_and_irrelevant_options():
    base = DatasetOptions(name="a", tokenizer="char")
    assert base.canonical() == DatasetOptions(name="b", tokenizer="char", vocab_size=999,
                                              source_uri="s3://x/y").canonical()
    assert base.canonical() != DatasetOptions(name="a", tokenizer="char", split_seed=1).canonical()


def test_the_content_address_of_earlier_options_is_unchanged():
    """Versions created before tokenizer=model existed keep their address: the new keys are absent for them."""
    assert DatasetOptions(name="a", tokenizer="char").canonical() == (
        '{"completion_field":"completion","document_mode":"blank-line","format":"text","fractions":{"calibration":'
        '0.02,"test":0.03,"train":0.9,"validation":0.05},"max_doc_chars":0,"min_doc_chars":1,"near_dup_threshold":'
        '0.8,"prompt_field":"prompt","split_seed":0,"text_field":"text","tokenizer":"char","vocab_size":0}')
    # pairs are built as conversations with loss masks now, no longer as text: not the old address
    old_pairs = ('{"completion_field":"completion","document_mode":"","format":"pairs","fractions":{"calibration":'
                 '0.02,"test":0.03,"train":0.9,"validation":0.05},"max_doc_chars":0,"min_doc_chars":1,'
                 '"near_dup_threshold":0.8,"prompt_field":"prompt","split_seed":0,"text_field":"text","tokenizer":'
                 '"char","vocab_size":0}')
    assert DatasetOptions(name="a", format="pairs", tokenizer="char").canonical() != old_pairs
    assert '"document_mode":""' in DatasetOptions(name="a", format="chat", tokenizer="char").canonical()
    one = DatasetOptions(name="a", tokenizer="model", tokenizer_model="base", tokenizer_model_version=1)
    assert one.canonical() != DatasetOptions(name="a", tokenizer="model", tokenizer_model="base",
                                             tokenizer_model_version=2).canonical()


def test_round_trip_through_dict():
    options = DatasetOptions(name="a", fractions=Fractions(0.8, 0.1, 0.1, 0.0))
    assert DatasetOptions.from_dict(options.as_dict()) == options


def test_parse_s3_uri():
    assert parse_s3_uri("s3://bucket/dir/file.txt") == ("bucket", "dir/file.txt")
    with pytest.raises(ValidationFailed):
        parse_s3_uri("s3://bucket")
