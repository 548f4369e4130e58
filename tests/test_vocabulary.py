"""The shapes world's pruned CLIP tokenizer, the world's word list, and the out-of-world warning."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from transformers import CLIPTokenizer

from ldm.data.shapes import KINDS, make_scene, world_words
from ldm.text import LdmWarning, prune_clip_bpe

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "assets" / "clip-tokenizer"
SHAPES = ROOT / "assets" / "shapes-tokenizer"


def _tokenizer(folder: Path) -> CLIPTokenizer:
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))


@pytest.fixture(scope="module")
def full():
    return _tokenizer(CLIP)


@pytest.fixture(scope="module")
def small():
    return _tokenizer(SHAPES)


def test_world_words_are_exactly_the_words_of_the_captions():
    seen = {w for i in range(1200) for w in make_scene(0, i).caption.split()}
    assert seen == set(world_words())
    assert len(world_words()) == 32


def test_every_world_word_splits_as_under_full_clip(full, small):
    for word in world_words():
        assert small.tokenize(word) == full.tokenize(word), word
    caption = make_scene(0, 3).caption
    assert small.tokenize(caption) == full.tokenize(caption)
    assert len(small) == 608 and len(full) == 49408


def test_the_shipped_tokenizer_is_what_the_script_writes(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_shapes_tokenizer.py"), str(tmp_path / "tok")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "tok" / name).read_bytes() == (SHAPES / name).read_bytes()


def test_pruning_keeps_bytes_specials_and_contiguous_ids():
    vocab = json.loads((CLIP / "vocab.json").read_text(encoding="utf-8"))
    merges = (CLIP / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    pruned, kept = prune_clip_bpe(vocab, merges, ["red"])
    assert sorted(pruned.values()) == list(range(len(pruned)))
    assert list(pruned)[:512] == sorted(vocab, key=vocab.get)[:512]  # the byte symbols, in CLIP's order
    assert "<|startoftext|>" in pruned and "<|endoftext|>" in pruned and "red</w>" in pruned
    assert kept == [m for m in merges if m in kept]  # original rank order
    with pytest.raises(ValueError, match="lower-case letters"):
        prune_clip_bpe(vocab, merges, ["Red"])


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=40))
def test_any_text_still_tokenizes_and_decodes_as_under_full_clip(text):
    """Out-of-world text falls back to smaller pieces, down to single bytes: never an unknown
    token, and decoding gives what the full CLIP vocabulary gives."""
    small, full = _TOKENIZERS["small"], _TOKENIZERS["full"]
    ids = small(text).input_ids
    assert all(0 <= i < len(small) for i in ids)
    assert small.convert_tokens_to_ids(small.unk_token) not in ids[1:-1]
    assert small.decode(ids, skip_special_tokens=True) == full.decode(full(text).input_ids, skip_special_tokens=True)


_TOKENIZERS = {"small": _tokenizer(SHAPES), "full": _tokenizer(CLIP)}


def test_unseen_words_warn_once_and_name_them(tiny_pipe):
    tiny_pipe.training_words = frozenset(world_words())
    try:
        assert tiny_pipe.unseen_words(["a red circle", "A Corgi in a bowtie, 3 times!"]) == ["corgi", "in", "bowtie", "3", "times"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tiny_pipe(["a corgi in a bowtie", "a red circle"], negative_prompt="blurry", num_inference_steps=2, seed=0, progress=False)
        unseen = [w for w in caught if issubclass(w.category, LdmWarning) and "never saw" in str(w.message)]
        assert len(unseen) == 1  # (the tiny test tokenizer also truncates the prompt: another warning)
        assert "these words in training: 'corgi', 'in', 'bowtie', 'blurry';" in str(unseen[0].message)
        assert "--model PATH" in str(unseen[0].message) and "\n" not in str(unseen[0].message)
        assert unseen[0].filename == __file__  # attributed to the caller's line
        assert tiny_pipe.unseen_words(["a large red circle to the left of two blue squares on a gray background"]) == []
        with warnings.catch_warnings():
            warnings.simplefilter("error", LdmWarning)
            tiny_pipe("two red circles", num_inference_steps=2, seed=0, progress=False)
    finally:
        tiny_pipe.training_words = None


def test_training_words_survive_a_save(tiny_pipe, tmp_path):
    from ldm import LatentPipeline

    tiny_pipe.training_words = frozenset({"red", "circle"})
    try:
        path = tiny_pipe.save_pretrained(tmp_path / "p")
    finally:
        tiny_pipe.training_words = None
    assert (path / "training_words.txt").read_text() == "circle\nred\n"
    assert LatentPipeline.from_pretrained(path, device="cpu").training_words == {"red", "circle"}
    assert LatentPipeline.from_pretrained(tmp_path / "p", device="cpu").unseen_words(["a red dog"]) == ["a", "dog"]


def test_kinds_cover_the_grammar():
    assert {make_scene(0, i).kind for i in range(12)} == set(KINDS)
