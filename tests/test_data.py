"""Tests for snn_distill.data: loading, held-out split, tokenizing/packing and batching.

Everything is local: a real WordLevel tokenizer trained here, datasets written to tmp_path.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch

from snn_distill.data import (
    DATASET_ALIASES,
    BlockBatcher,
    DataError,
    load_texts,
    resolve_dataset,
    split_held_out,
    synthetic_prompts,
    tokenize_texts,
    unigram_counts,
)

# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    """A real fast tokenizer (word level, whitespace/punctuation split) with EOS and PAD tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"])
    tok.train_from_iterator(synthetic_prompts(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _rows(input_ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[int, ...]]:
    """The unpadded blocks of a batch."""
    return [tuple(row[m.bool()].tolist()) for row, m in zip(input_ids, mask)]


# ------------------------------------------------------------------------------------------------
# Synthetic prompts and names
# ------------------------------------------------------------------------------------------------


def test_synthetic_prompts_are_many_distinct_varied_and_deterministic():
    prompts = synthetic_prompts()
    assert len(prompts) >= 500
    assert len(set(prompts)) == len(prompts)
    assert prompts == synthetic_prompts()
    assert all(isinstance(p, str) and p == p.strip() for p in prompts)
    words = [len(p.split()) for p in prompts]
    assert min(words) >= 5 and max(words) <= 40
    assert min(words) < 8 and max(words) > 25  # short requests and long multi-sentence ones
    assert sum(p.startswith("User:") and "Assistant:" in p for p in prompts) >= 50
    # Interleaved, so even a short prefix mixes the kinds of requests.
    head = " ".join(prompts[:60])
    markers = ("nearest", "Text ", "Describe", "Remind", "Translate", "calendar", "rain", "recipe", "menu")
    for marker in markers:
        assert marker in head, marker


def test_resolve_dataset_aliases_and_config_syntax():
    assert resolve_dataset("wikitext-2") == ("wikitext", "wikitext-2-raw-v1")
    assert resolve_dataset("wikitext-103") == ("wikitext", "wikitext-103-raw-v1")
    assert resolve_dataset("wikitext-2-raw") == DATASET_ALIASES["wikitext-2"]
    assert resolve_dataset("tinystories") == ("roneneldan/TinyStories", None)
    assert resolve_dataset("wikitext:wikitext-103-v1") == ("wikitext", "wikitext-103-v1")
    assert resolve_dataset("org/name") == ("org/name", None)
    with pytest.raises(DataError, match="name:config"):
        resolve_dataset("wikitext:")


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def test_prompts_file_skips_blank_lines(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("Where am I?\n\n   \nText Maya hi.\n\t\nRead the sign.\n", encoding="utf-8")
    assert load_texts(dataset_path=str(f)) == ["Where am I?", "Text Maya hi.", "Read the sign."]
    assert load_texts(dataset_path=str(f), max_texts=2) == ["Where am I?", "Text Maya hi."]


def test_missing_and_empty_prompt_files_raise(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_texts(dataset_path=str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no non-empty texts"):
        load_texts(dataset_path=str(empty))
    with pytest.raises(DataError, match="does not exist"):
        load_texts(dataset=str(tmp_path / "missing.jsonl"))  # path-like: no Hub round trip


def test_synthetic_is_default():
    assert load_texts() == synthetic_prompts()
    assert load_texts("synthetic", max_texts=5) == synthetic_prompts()[:5]


def test_local_txt_and_jsonl(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("first line\n\nsecond line\n", encoding="utf-8")
    assert load_texts(str(txt)) == ["first line", "second line"]

    jsonl = tmp_path / "stories.jsonl"
    rows = [{"id": 1, "story": "Once upon a time."}, {"id": 2, "story": "  "}, {"id": 3, "story": "The end."}]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert load_texts(str(jsonl)) == ["Once upon a time.", "The end."]

    # No preferred name: the first column holding strings is used.
    other = tmp_path / "other.jsonl"
    other.write_text('{"n": 1, "body": "hello there"}\n{"n": 2, "body": "good day"}\n', encoding="utf-8")
    assert load_texts(str(other)) == ["hello there", "good day"]

    # "text" beats other string columns.
    both = tmp_path / "both.jsonl"
    both.write_text('{"title": "T", "text": "body one"}\n', encoding="utf-8")
    assert load_texts(str(both)) == ["body one"]


def test_jsonl_errors(tmp_path):
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"a": 1, "b": 2.5}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"no text column \(columns: a, b\)"):
        load_texts(str(numbers))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match="broken.jsonl:2 is not valid JSON"):
        load_texts(str(broken))


def test_save_to_disk_dataset_and_datasetdict(tmp_path):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_dict({"label": [0, 1, 2], "sentence": ["a cat", "", "a dog"]})
    ds.save_to_disk(str(tmp_path / "single"))
    assert load_texts(str(tmp_path / "single")) == ["a cat", "a dog"]

    dd = DatasetDict(
        {
            "validation": Dataset.from_dict({"text": ["val one", "val two"]}),
            "train": Dataset.from_dict({"text": ["train one", " \n", "train two"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    assert load_texts(str(tmp_path / "dict")) == ["train one", "train two"]
    assert load_texts(str(tmp_path / "dict"), split="validation") == ["val one", "val two"]
    # An unknown split falls back to train.
    assert load_texts(str(tmp_path / "dict"), split="test") == ["train one", "train two"]

    DatasetDict({"dev": Dataset.from_dict({"content": ["only split"]})}).save_to_disk(str(tmp_path / "dev"))
    assert load_texts(str(tmp_path / "dev")) == ["only split"]  # no train: the first split

    # A dataset_path that is a save_to_disk folder works the same way.
    assert load_texts(dataset_path=str(tmp_path / "single")) == ["a cat", "a dog"]


def test_dataset_without_string_column_errors(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"x": [1, 2], "y": [0.5, 1.5]}).save_to_disk(str(tmp_path / "nums"))
    with pytest.raises(DataError, match=r"no text column \(columns: x, y\)"):
        load_texts(str(tmp_path / "nums"))
    (tmp_path / "plain_folder").mkdir()
    with pytest.raises(DataError, match="not a datasets save_to_disk folder"):
        load_texts(str(tmp_path / "plain_folder"))


def test_unknown_hub_id_fails_fast_offline(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # Simulate datasets having been imported before the variable was set (it reads it at import):
    # load_texts must still honour it, or the offline miss takes ~25 s of HTTP retries.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = datasets.config.HF_HUB_OFFLINE
    attempts: list[object] = []  # any network attempt (the slow path: HTTP retries) is recorded and refused

    def no_network(*args, **kwargs):
        attempts.append(args[1:] or args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(DataError, match="not found locally or on the Hugging Face Hub") as info:
        load_texts("snn-distill-test-org/no-such-dataset-xyz")
    assert attempts == []  # offline honoured: not one connection or DNS lookup
    msg = str(info.value)
    assert "\n" not in msg and "no-such-dataset-xyz" in msg and "save_to_disk" in msg
    assert datasets.config.HF_HUB_OFFLINE is before is False  # the offline switch was only temporary
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_bad_max_texts():
    with pytest.raises(DataError, match="max_texts"):
        load_texts(max_texts=0)


# ------------------------------------------------------------------------------------------------
# Held-out split
# ------------------------------------------------------------------------------------------------


def test_split_held_out_properties():
    texts = [f"text {i}" for i in range(100)]
    train, held = split_held_out(texts, 0.1, seed=0)
    assert len(held) == 10 and len(train) == 90
    assert set(train).isdisjoint(held) and sorted(train + held) == sorted(texts)
    assert train == [t for t in texts if t in set(train)]  # original order kept
    assert split_held_out(texts, 0.1, seed=0) == (train, held)
    assert split_held_out(texts, 0.1, seed=1)[1] != held

    assert split_held_out(texts, 0.0, seed=0) == (texts, [])
    assert split_held_out(["a", "b"], 0.01, seed=0)[1] in (["a"], ["b"])  # at least one each side
    tr, he = split_held_out(["a", "b", "c"], 0.49, seed=3)
    assert len(tr) >= 1 and len(he) >= 1
    assert split_held_out(["only"], 0.2, seed=0) == (["only"], [])
    with pytest.raises(DataError, match="held-out fraction"):
        split_held_out(texts, 1.0, seed=0)


# ------------------------------------------------------------------------------------------------
# Tokenizing and packing
# ------------------------------------------------------------------------------------------------


def test_tokenize_without_packing_truncates_and_drops_short(tokenizer):
    texts = ["Describe what's in front of me.", "Hi", "Text Maya that I'm running ten minutes late."]
    blocks = tokenize_texts(texts, tokenizer, max_length=6)
    assert len(blocks) == 2  # "Hi" is a single token: nothing to predict
    assert blocks[0] == _ids(tokenizer, texts[0])[:6]
    assert blocks[1] == _ids(tokenizer, texts[2])[:6]
    assert all(2 <= len(b) <= 6 for b in blocks)
    with pytest.raises(DataError, match="max_length"):
        tokenize_texts(texts, tokenizer, max_length=1)


def test_packing_uses_eos_separators_and_loses_only_the_tail(tokenizer):
    texts = synthetic_prompts()[:40]
    eos = tokenizer.eos_token_id
    flat: list[int] = []
    for i, t in enumerate(texts):
        flat += ([eos] if i else []) + _ids(tokenizer, t)
    for max_length in (7, 16, 64):
        blocks = tokenize_texts(texts, tokenizer, max_length=max_length, pack=True)
        joined = [tok for b in blocks for tok in b]
        assert all(len(b) == max_length for b in blocks[:-1])
        assert 2 <= len(blocks[-1]) <= max_length
        assert joined == flat[: len(joined)]
        assert len(flat) - len(joined) < 2  # only a 1-token tail can be dropped
        assert joined.count(eos) >= len(texts) - 2
    # Packing makes fewer, fuller blocks than one block per text.
    unpacked = tokenize_texts(texts, tokenizer, max_length=64)
    packed = tokenize_texts(texts, tokenizer, max_length=64, pack=True)
    assert len(packed) < len(unpacked)


def test_packing_drops_a_one_token_tail(tokenizer):
    text = "Describe what's in front of me."  # 8 tokens: ["Describe", "what", "'", "s", ...]
    n = len(_ids(tokenizer, text))
    blocks = tokenize_texts([text], tokenizer, max_length=n - 1, pack=True)
    assert [len(b) for b in blocks] == [n - 1]


def test_tokenize_many_lines_in_one_call(tokenizer):
    """~10k lines in one batched tokenizer call (its speed is measured in bench/, not here)."""
    texts = synthetic_prompts() * 13
    blocks = tokenize_texts(texts, tokenizer, max_length=32, pack=True)
    assert len(blocks) > 1000 and all(len(b) == 32 for b in blocks[:-1]) and 2 <= len(blocks[-1]) <= 32
    head = tokenize_texts(texts[:50], tokenizer, max_length=32, pack=True)
    assert blocks[: len(head) - 1] == head[:-1]  # the same blocks as a small call, in order


# ------------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------------


def _blocks(n: int = 23) -> list[list[int]]:
    """Distinct blocks of lengths 2..6 with ids >= 1 (0 is the pad id)."""
    return [[i + 1] * (2 + i % 5) for i in range(n)]


def test_batcher_pads_right_and_masks():
    blocks = [[5, 6], [7, 8, 9, 10], [11, 12, 13]]
    b = BlockBatcher(blocks, batch_size=3, pad_id=0, shuffle=False)
    ids, mask = b.next_batch()
    assert ids.dtype == torch.int64 and mask.dtype == torch.int64
    assert ids.tolist() == [[5, 6, 0, 0], [7, 8, 9, 10], [11, 12, 13, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert len(b) == 3 and b.num_tokens == 9
    # No pad token (GPT-2): padding uses id 0, hidden by the mask.
    ids, mask = BlockBatcher(blocks, batch_size=3, pad_id=None, shuffle=False).next_batch()
    assert ids[0].tolist() == [5, 6, 0, 0] and mask[0].tolist() == [1, 1, 0, 0]


def test_batcher_is_deterministic_and_cycles_epochs():
    blocks = _blocks(24)
    a = BlockBatcher(blocks, batch_size=4, pad_id=0, seed=7)
    b = BlockBatcher(blocks, batch_size=4, pad_id=0, seed=7)
    epochs = []
    for _ in range(3):
        seen = []
        for _ in range(len(blocks) // 4):
            x, mx = a.next_batch()
            y, my = b.next_batch()
            assert torch.equal(x, y) and torch.equal(mx, my)
            seen += _rows(x, mx)
        assert sorted(seen) == sorted(tuple(blk) for blk in blocks)  # each block once per epoch
        epochs.append(seen)
    assert epochs[0] != epochs[1] != epochs[2]  # a new permutation each epoch
    other = BlockBatcher(blocks, batch_size=4, pad_id=0, seed=8)
    assert _rows(*other.next_batch()) != epochs[0][:4]


def test_batcher_batches_span_epoch_boundaries():
    blocks = _blocks(5)
    b = BlockBatcher(blocks, batch_size=3, pad_id=0, shuffle=False)
    rows = [r for _ in range(4) for r in _rows(*b.next_batch())]
    expected = [tuple(blk) for blk in blocks] * 3
    assert rows == expected[:12]
    assert b.state_dict()["epoch"] == 2 and b.state_dict()["position"] == 2


def test_batcher_shards_are_disjoint():
    blocks = _blocks(23)
    world = 3
    shards = [BlockBatcher(blocks, batch_size=1, pad_id=0, seed=5, shard=(r, world)) for r in range(world)]
    assert sum(len(s) for s in shards) == len(blocks)
    for epoch in range(2):
        per_rank = [{r for _ in range(len(s)) for r in _rows(*s.next_batch())} for s in shards]
        for i in range(world):
            for j in range(i + 1, world):
                assert per_rank[i].isdisjoint(per_rank[j]), epoch
        assert set().union(*per_rank) == {tuple(blk) for blk in blocks}
    with pytest.raises(DataError, match="rank"):
        BlockBatcher(blocks, batch_size=1, pad_id=0, shard=(3, 3))


def test_batcher_resume_gives_identical_batches():
    blocks = _blocks(17)
    a = BlockBatcher(blocks, batch_size=5, pad_id=0, seed=3)
    for _ in range(6):  # past the first epoch boundary
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # as stored in a checkpoint
    expected = [a.next_batch() for _ in range(8)]

    b = BlockBatcher(blocks, batch_size=5, pad_id=0, seed=3)
    b.next_batch()  # a fresh run that already moved must still jump to the saved spot
    b.load_state_dict(state)
    for want in expected:
        got = b.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    c = BlockBatcher(blocks[:-1], batch_size=5, pad_id=0, seed=3)
    with pytest.raises(DataError, match="num_blocks"):
        c.load_state_dict(state)


def test_batcher_rejects_no_blocks():
    with pytest.raises(DataError, match="no training sequences of at least 2 tokens"):
        BlockBatcher([], batch_size=2, pad_id=0)
    with pytest.raises(DataError, match="no training sequences"):
        BlockBatcher([[1]], batch_size=2, pad_id=0)


def test_unigram_counts():
    blocks = [[1, 2, 2], [3, 1]]
    counts = unigram_counts(blocks, vocab_size=5)
    assert counts.dtype == torch.float64 and counts.shape == (5,)
    assert counts.tolist() == [0.0, 2.0, 2.0, 1.0, 0.0]
    with pytest.raises(DataError, match="vocab_size"):
        unigram_counts(blocks, vocab_size=3)
