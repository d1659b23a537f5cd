import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from jaxpaged.detokenizer import (
    IncrementalDetokenizer,
    check_stop,
    decode_logprob_tokens,
    stop_buffer_length,
)
from jaxpaged.outputs import Logprob

CORPUS = [
    "héllo wörld 日本語 emoji 🙂 and more 🙂🙂 text",
    "naïve café résumé 東京 中文 😀 👍🏽 Ελληνικά",
    "the quick brown fox jumps over the lazy dog",
]
TEXTS = [
    "日本語 🙂 héllo wörld",
    "👍🏽👍🏽 naïve café, 東京 and 中文!",
    "plain ascii text, the quick brown fox",
    "Ελληνικά 😀😀😀 résumé",
]


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
    )


def _stream(tokenizer, prompt_ids, output_ids, skip_special_tokens=True, chunk=1):
    """Feed output_ids in chunks; check the text against a full decode after every step."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
    pieces = []
    for i in range(0, len(output_ids), chunk):
        new = detok.append(output_ids[i : i + chunk])
        pieces.append(new)
        assert "\ufffd" not in new
        full = tokenizer.decode(output_ids[: i + chunk], skip_special_tokens=skip_special_tokens)
        if full.endswith("\ufffd"):
            # Held back: nothing past the complete part of the text has been emitted.
            assert full.rstrip("\ufffd").startswith(detok.output_text)
        else:
            assert detok.output_text == full
    assert "".join(pieces) == detok.output_text
    return detok


def test_multibyte_characters_are_split_over_tokens(tokenizer):
    # The test is only meaningful if some single tokens decode to an incomplete character.
    ids = tokenizer.encode(TEXTS[0])
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in ids)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_equals_full_decode(tokenizer, text, chunk):
    prompt = tokenizer.encode("the quick 日本")
    output = tokenizer.encode(text)
    detok = _stream(tokenizer, prompt, output, chunk=chunk)
    assert detok.output_text == text
    assert detok.output_token_ids == output


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tokenizer, skip):
    eos, im = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>"])
    output = (
        [im] + tokenizer.encode("日本語 🙂") + [eos] + tokenizer.encode(" wörld")
        + [im, eos] + tokenizer.encode("👍🏽")
    )
    detok = _stream(tokenizer, [im] + tokenizer.encode("héllo"), output, skip_special_tokens=skip)
    expected = tokenizer.decode(output, skip_special_tokens=skip)
    assert detok.output_text == expected
    assert ("<|endoftext|>" in detok.output_text) is (not skip)


def test_long_sequence_window_trimming(tokenizer):
    output = tokenizer.encode(" ".join(TEXTS * 20))
    assert len(output) > 600
    detok = _stream(tokenizer, [], output, chunk=2)
    assert detok.output_text == " ".join(TEXTS * 20)


def test_random_token_ids_match_after_flush(tokenizer):
    rng = np.random.default_rng(0)
    for _ in range(20):
        output = rng.integers(0, len(tokenizer), size=30).tolist()
        detok = IncrementalDetokenizer(tokenizer, rng.integers(0, 300, size=8).tolist())
        for t in output:
            detok.append([t])
        detok.flush()
        assert detok.output_text == tokenizer.decode(output, skip_special_tokens=True)


def test_flush_emits_trailing_incomplete_character(tokenizer):
    ids = tokenizer.encode(TEXTS[1] + TEXTS[0])
    cut = max(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    full = tokenizer.decode(ids[:cut])
    assert len(full.rstrip("\ufffd")) > 10
    detok = IncrementalDetokenizer(tokenizer, [])
    for t in ids[:cut]:
        detok.append([t])
    before = detok.output_text
    assert before and full.startswith(before) and "\ufffd" not in before
    flushed = detok.flush()
    assert flushed.endswith("\ufffd")
    assert before + flushed == detok.output_text == full


def test_check_stop_in_new_text():
    assert check_stop("hello world", 6, ["wor"], False) == ("wor", "hello ")
    assert check_stop("hello world", 6, ["wor"], True) == ("wor", "hello wor")
    assert check_stop("hello world", 6, ["xyz"], False) is None
    assert check_stop("hello world", 0, ["wor"], False) is None
    assert check_stop("hello world", 6, [], False) is None


def test_check_stop_earliest_match_wins():
    assert check_stop("abc STOP def END", 16, ["END", "STOP"], False) == ("STOP", "abc ")


def test_check_stop_ignores_matches_wholly_in_old_text():
    # "ab" was fully present before the 3 new characters, so it was already checked then.
    assert check_stop("xxab--yz", 3, ["ab"], False) is None
    assert check_stop("xxab--yz", 5, ["ab"], False) == ("ab", "xx")


def test_stop_string_straddling_two_increments(tokenizer):
    text = "the quick brown fox 日本語 🙂 jumps"
    output = tokenizer.encode(text)
    stop = ["fox 日本"]
    detok = IncrementalDetokenizer(tokenizer, [])
    found = None
    for t in output:
        new = detok.append([t])
        result = check_stop(detok.output_text, len(new), stop, False)
        if result is not None:
            found = result
            break
    assert found == ("fox 日本", "the quick brown ")
    # The match was completed by the last increment, not contained in it.
    assert not new.startswith("f")


def test_stop_buffer_length():
    assert stop_buffer_length(["ab", "wxyz"], False) == 3
    assert stop_buffer_length(["ab"], True) == 0
    assert stop_buffer_length([], False) == 0


def test_decode_logprob_tokens(tokenizer):
    ids = tokenizer.encode("héllo wörld")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    entries = [None, {ids[0]: Logprob(-0.5, 1), eos: Logprob(-2.0, 2)}]
    decode_logprob_tokens(tokenizer, entries)
    assert entries[1][ids[0]].decoded_token == tokenizer.decode([ids[0]])
    assert entries[1][eos].decoded_token == "<|endoftext|>"
