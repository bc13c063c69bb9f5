"""language: shipped samples, tokenizer training/loading, temperature sampling, packing, mixing."""

from __future__ import annotations

import pickle
import random
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from language.data import (IGNORE_INDEX, LanguageMixer, TextPacker, attention_mask_from_doc_ids, collate_packed,
                           mix_languages, pack_documents, sample_text_dir, temperature_ratios)
from language.tokenizer import Tokenizer, train_tokenizer

LANGS = ["ar", "de", "el", "en", "es", "fr", "hi", "ja", "ko", "ru", "zh"]
EOS, PAD, BOS = 2, 3, 1

# One new sentence per script (not in the samples), all NFKC-stable, so the round trip must be exact.
SENTENCES = {
    "latin": "Yesterday the café near the bridge sold 37 crêpes, and Zoë bought the last one.",
    "cyrillic": "Вчера в маленьком кафе у моста продали тридцать семь блинов.",
    "greek": "Χθες το μικρό καφενείο δίπλα στη γέφυρα πούλησε τριάντα επτά κρέπες.",
    "arabic": "باع المقهى الصغير قرب الجسر أمس سبعا وثلاثين فطيرة.",
    "devanagari": "कल पुल के पास वाली छोटी दुकान ने सैंतीस पराठे बेचे।",
    "han": "昨天桥边的小咖啡馆卖出了三十七个煎饼。",
    "kana": "きのう、橋のそばの小さな喫茶店でクレープが三十七枚売れた。",
    "hangul": "어제 다리 옆 작은 카페에서 크레이프가 서른일곱 개 팔렸다.",
}


def _read_lines(lang: str) -> list[str]:
    """Documents of a sample file the way mmoe.data.TextSource splits it (non-empty lines)."""
    data = (sample_text_dir() / f"{lang}.txt").read_bytes()
    return [raw.decode("utf-8").rstrip("\r") for raw in data.split(b"\n") if raw.decode("utf-8").strip()]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok") / "multi"
    return train_tokenizer(sample_text_dir(), out, vocab_size=3000, lang_tokens=True, seed=0)


# ------------------------------------------------------------------------------------------------
# shipped samples


SCRIPT_RANGES = {"ru": (0x0400, 0x04FF), "el": (0x0370, 0x03FF), "ar": (0x0600, 0x06FF), "hi": (0x0900, 0x097F),
                 "zh": (0x4E00, 0x9FFF), "ja": (0x3040, 0x30FF), "ko": (0xAC00, 0xD7A3)}


def test_samples_are_one_file_per_language_in_their_scripts():
    from mmoe.data import TextSource

    folder = sample_text_dir()
    assert folder.is_dir() and folder == Path(__file__).resolve().parents[1] / "language" / "samples"
    assert sorted(p.stem for p in folder.glob("*.txt")) == LANGS
    for lang in LANGS:
        data = (folder / f"{lang}.txt").read_bytes()
        assert not data.startswith(b"\xef\xbb\xbf"), lang
        text = data.decode("utf-8")
        lines = text.splitlines()
        assert 60 <= len(lines) <= 120, (lang, len(lines))
        assert 6_000 <= len(data) <= 15_000, (lang, len(data))
        assert all(line.strip() == line and line for line in lines), lang
        assert len(set(lines)) == len(lines), f"{lang}: duplicate documents"
        assert unicodedata.normalize("NFC", text) == text, lang
        if lang in SCRIPT_RANGES:
            lo, hi = SCRIPT_RANGES[lang]
            in_script = sum(lo <= ord(c) <= hi for c in text)
            assert in_script > 0.4 * sum(not c.isspace() for c in text), lang
    source = TextSource(folder)
    docs = list(source)
    assert source.info()["docs_per_language"] == {lang: len(_read_lines(lang)) for lang in LANGS}
    assert {d["json"]["lang"] for d in docs} == set(LANGS)


# ------------------------------------------------------------------------------------------------
# tokenizer


def test_round_trip_is_exact_in_every_script_and_for_unseen_characters(tok):
    for script, text in SENTENCES.items():
        assert unicodedata.normalize("NFKC", text) == text
        ids = tok.encode(text)
        assert tok.unk_id not in ids, script
        assert tok.decode(ids) == text, script
    # Emoji and a rare CJK character (not in the samples) go through byte fallback.
    for text in ["Good morning ☀️😀🚲!", "龘 and 𠀋 are rare", "tabs\tand\nnewlines,  double  spaces ", " lead"]:
        ids = tok.encode(text)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text
    emoji_ids = tok.encode("😀")
    assert all(tok.sp.is_byte(i) for i in emoji_ids if tok.id_to_piece(i) != "▁")
    assert [tok.id_to_piece(i) for i in emoji_ids if tok.sp.is_byte(i)] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_every_sample_line_round_trips_up_to_nfkc(tok):
    changed = 0
    for lang in LANGS:
        for line in _read_lines(lang):
            expected = unicodedata.normalize("NFKC", line)
            changed += expected != line
            assert tok.decode(tok.encode(line)) == expected, (lang, line)
    assert changed > 0  # Chinese full-width punctuation: NFKC folds it (see the module docstring)


def test_identity_normalization_bpe_round_trips_every_sample_line_exactly(tmp_path):
    tok = train_tokenizer(sample_text_dir(), tmp_path / "bpe", vocab_size=2000, model_type="bpe",
                          normalization="identity", character_coverage=0.999)
    assert tok.info["options"]["model_type"] == "bpe" and tok.vocab_size == 2000
    for lang in LANGS:
        for line in _read_lines(lang):
            assert tok.decode(tok.encode(line)) == line, (lang, line)
    assert tok.decode(tok.encode("早上，中午！")) == "早上，中午！"


def test_special_ids_framing_and_decode_skips(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert tok.vocab_size == len(tok) == 3000
    plain = tok.encode("Es regnet.")
    framed = tok.encode("Es regnet.", add_bos=True, add_eos=True)
    assert framed == [1, *plain, 2]
    assert tok.decode(framed + [3, 3, -100]) == "Es regnet."
    assert tok.decode(torch.tensor(framed)) == "Es regnet."
    batch = tok.encode_batch(["a b", "Снег"], add_eos=True)
    assert batch == [tok.encode("a b", add_eos=True), tok.encode("Снег", add_eos=True)]
    assert tok.decode_batch(torch.tensor([[*plain, 3]])) == ["Es regnet."]
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TypeError):
        tok.encode(["not", "a", "str"])


def test_lang_tokens(tok):
    assert tok.languages == LANGS
    ids = {lang: tok.lang_id(lang) for lang in LANGS}
    assert len(set(ids.values())) == len(LANGS)
    for lang, i in ids.items():
        assert tok.id_to_piece(i) == f"<2{lang}>"
        assert tok.piece_to_id(f"<2{lang}>") == i
        assert tok.info["lang_tokens"][lang] == i
    # A tag is one unsplittable piece in text.
    assert ids["de"] in tok.encode("<2de>Guten Morgen")
    with pytest.raises(KeyError, match="'xx'"):
        tok.lang_id("xx")


def test_tokenizer_load_errors_name_the_path(tmp_path, tok):
    missing = tmp_path / "nowhere" / "tok.model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        Tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.load(tmp_path / "nope")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00\xffthis is not a sentencepiece model" * 4)
    with pytest.raises(ValueError, match=str(bad)):
        Tokenizer(bad)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=str(empty)):
        Tokenizer(empty)
    # Loading by prefix and by path give the same model; the tokenizer pickles.
    prefix = tok.path.with_suffix("")
    again = Tokenizer.load(prefix)
    assert again.path == tok.path and again.info == tok.info
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(SENTENCES["hangul"]) == tok.encode(SENTENCES["hangul"])


def test_sampling_probabilities_follow_the_temperature_formula(tok):
    info = tok.info
    chars = {lang: sum(len(line) for line in _read_lines(lang)) for lang in LANGS}
    docs = {lang: len(_read_lines(lang)) for lang in LANGS}
    total = sum(chars.values())
    weights = {lang: (chars[lang] / total) ** 0.3 for lang in LANGS}
    expected = {lang: w / sum(weights.values()) for lang, w in weights.items()}
    assert info["sampling"]["temperature"] == 0.3 and info["sampling"]["count_by"] == "chars"
    assert sorted(info["languages"]) == LANGS
    sampled_total = sum(v["sampled_chars"] for v in info["languages"].values())
    for lang in LANGS:
        entry = info["languages"][lang]
        assert entry["docs"] == docs[lang] and entry["chars"] == chars[lang]
        assert entry["probability"] == pytest.approx(expected[lang], rel=1e-12)
        # The training sample has the probabilities as its character shares (up to one document).
        assert entry["sampled_chars"] / sampled_total == pytest.approx(expected[lang], abs=0.01)
    # Temperature 0.3 flattens the distribution: the smallest language is upsampled.
    small, big = min(chars, key=chars.get), max(chars, key=chars.get)
    assert expected[big] / expected[small] < chars[big] / chars[small]
    assert info["languages"][small]["sampled_chars"] > chars[small]


def test_doc_sampling_is_exact_and_deterministic(tmp_path):
    kwargs = dict(vocab_size=2000, temperature=0.5, count_by="docs", max_sentences=400,
                  character_coverage=0.99, seed=3)
    a = train_tokenizer(sample_text_dir(), tmp_path / "a", **kwargs)
    b = train_tokenizer(sample_text_dir(), tmp_path / "b", **kwargs)
    docs = {lang: len(_read_lines(lang)) for lang in LANGS}
    probs = temperature_ratios(docs, 0.5)
    for lang in LANGS:
        entry = a.info["languages"][lang]
        assert entry["probability"] == pytest.approx(probs[lang])
        assert entry["sampled_docs"] == max(1, round(probs[lang] * 400))
    assert a.info["sampling"]["budget_docs"] == 400
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.info["languages"] == b.info["languages"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.model", "a.vocab",
                                                          "b.json", "b.model", "b.vocab"]
    vocab = (tmp_path / "a.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == a.vocab_size and vocab[0] == "<unk>\t0"
    assert [line.split("\t")[0] for line in vocab[:300:7]] == [a.id_to_piece(i) for i in range(0, 300, 7)]


def test_train_from_shards_and_bad_shards(tmp_path):
    from mmoe.data import DataError, write_shards, write_text

    shards = tmp_path / "shards"
    write_text(sample_text_dir() / "en.txt", shards, samples_per_shard=30)
    tok = train_tokenizer(shards, tmp_path / "en", vocab_size=600, temperature=1.0)
    assert list(tok.info["languages"]) == ["en"] and tok.info["languages"]["en"]["probability"] == 1.0
    assert tok.decode(tok.encode("The rain stopped.")) == "The rain stopped."
    bad = tmp_path / "bad"
    write_shards([{"__key__": "doc1", "txt": "no language here", "json": {"source": "x"}}], bad)
    with pytest.raises(DataError, match="doc1"):
        train_tokenizer(bad, tmp_path / "bad_tok", vocab_size=300)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(shards, tmp_path / "tiny", vocab_size=200)


def test_temperature_ratios():
    counts = {"a": 900, "b": 90, "c": 10, "d": 0}
    assert temperature_ratios(counts, 1.0) == pytest.approx({"a": 0.9, "b": 0.09, "c": 0.01, "d": 0.0})
    assert temperature_ratios(counts, 0.0) == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3, "d": 0.0})
    p = temperature_ratios(counts, 0.5)
    z = 0.9 ** 0.5 + 0.09 ** 0.5 + 0.01 ** 0.5
    assert p == pytest.approx({"a": 0.9 ** 0.5 / z, "b": 0.09 ** 0.5 / z, "c": 0.01 ** 0.5 / z, "d": 0.0})
    assert sum(p.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="temperature"):
        temperature_ratios(counts, -1)
    with pytest.raises(ValueError, match="'x'"):
        temperature_ratios({"x": -3}, 0.3)
    with pytest.raises(ValueError, match="zero"):
        temperature_ratios({"x": 0}, 0.3)


# ------------------------------------------------------------------------------------------------
# packing


def _docs(lengths: list[int], langs: list[str]) -> list[tuple[list[int], str]]:
    """Documents with traceable token values: doc k holds 1000 * (k + 1) + j."""
    return [([1000 * (k + 1) + j for j in range(n)], lang) for k, (n, lang) in enumerate(zip(lengths, langs))]


def test_pack_small_example_exactly():
    rows = list(pack_documents([([10, 11, 12], "en"), ([20], "de")], 4, eos_id=EOS, pad_id=PAD))
    assert len(rows) == 2
    # stream: 10 11 12 </s> 20 </s>; row windows [10 11 12 </s> 20] and [20 </s> pad pad pad]
    assert rows[0]["input_ids"].tolist() == [10, 11, 12, EOS]
    assert rows[0]["labels"].tolist() == [11, 12, EOS, IGNORE_INDEX]  # eos -> next doc: masked
    assert rows[0]["doc_ids"].tolist() == [0, 0, 0, 0]
    assert rows[0]["positions"].tolist() == [0, 1, 2, 3]
    assert rows[0]["langs"] == ["en"]
    assert rows[1]["input_ids"].tolist() == [20, EOS, PAD, PAD]
    assert rows[1]["labels"].tolist() == [EOS, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert rows[1]["doc_ids"].tolist() == [0, 0, 1, 1]
    assert rows[1]["positions"].tolist() == [0, 1, 0, 1]
    assert rows[1]["langs"] == ["de", None]
    with_bos = list(pack_documents([([10, 11], "en"), ([20], "de")], 8, eos_id=EOS, pad_id=PAD, bos_id=BOS))
    assert with_bos[0]["input_ids"].tolist() == [BOS, 10, 11, EOS, BOS, 20, EOS, PAD]
    assert with_bos[0]["labels"].tolist() == [10, 11, EOS, IGNORE_INDEX, 20, EOS, IGNORE_INDEX, IGNORE_INDEX]


@pytest.mark.parametrize("drop_last", [False, True])
def test_pack_documents_invariants(drop_last):
    rng = random.Random(0)
    lengths = [rng.choice([0, 1, 2, 5, 9, 17, 30]) for _ in range(40)]
    langs = [rng.choice(["en", "de", "zh"]) for _ in lengths]
    docs = _docs(lengths, langs)
    seq_len = 8
    lang_index = {"de": 0, "en": 1, "zh": 2}
    rows = list(pack_documents(iter(docs), seq_len, eos_id=EOS, pad_id=PAD, drop_last=drop_last,
                               lang_index=lang_index))

    # The reference stream, with a document number per token (empty documents are skipped).
    stream, doc_of, doc_lang = [], [], []
    for ids, lang in docs:
        if ids:
            stream += ids + [EOS]
            doc_of += [len(doc_lang)] * (len(ids) + 1)
            doc_lang.append(lang)
    total = len(stream)
    assert len(rows) == ((total - 1) // seq_len if drop_last else -(-total // seq_len))

    inputs = []
    for r, row in enumerate(rows):
        for key in ("input_ids", "labels", "doc_ids", "positions", "lang_ids"):
            assert row[key].shape == (seq_len,) and row[key].dtype == torch.long, key
        start = r * seq_len
        inputs += row["input_ids"].tolist()
        for i in range(seq_len):
            g = start + i
            if g >= total:  # padding
                assert row["input_ids"][i] == PAD and row["labels"][i] == IGNORE_INDEX
                assert row["langs"][row["doc_ids"][i]] is None and row["lang_ids"][i] == -1
                continue
            assert row["input_ids"][i] == stream[g]
            same_doc = g + 1 < total and doc_of[g + 1] == doc_of[g]
            assert row["labels"][i] == (stream[g + 1] if same_doc else IGNORE_INDEX), (r, i)
            if stream[g] == EOS:
                assert row["labels"][i] == IGNORE_INDEX  # never predict the next document
            elif g + 1 < total and stream[g + 1] == EOS:
                assert row["labels"][i] == EOS  # the last token predicts its document's end
            # Positions restart at each document and at the row start; doc_ids count segments.
            seg_start = max(start, doc_of.index(doc_of[g]))
            assert row["positions"][i] == g - seg_start
            assert row["doc_ids"][i] == len({doc_of[k] for k in range(start, g + 1)}) - 1
            assert row["langs"][row["doc_ids"][i]] == doc_lang[doc_of[g]]
            assert row["lang_ids"][i] == lang_index[doc_lang[doc_of[g]]]
    # Every document's tokens appear in order exactly once as inputs.
    real = [t for t in inputs if t != PAD]
    assert real == (stream[:len(rows) * seq_len] if drop_last else stream)
    for k, (ids, _) in enumerate(docs):
        got = [t for t in real if 1000 * (k + 1) <= t < 1000 * (k + 2)]
        assert got == (ids if not drop_last else ids[:len(got)])
    if not drop_last:
        assert Counter(real)[EOS] == sum(1 for n in lengths if n)


def test_pack_documents_accepts_tensors_and_rejects_bad_items():
    rows = list(pack_documents([(torch.tensor([5, 6, 7]), "en")], 3, eos_id=EOS, pad_id=PAD))
    assert [r["input_ids"].tolist() for r in rows] == [[5, 6, 7], [EOS, PAD, PAD]]
    with pytest.raises(TypeError, match="document 0"):
        list(pack_documents([[5, 6, 7]], 3, eos_id=EOS, pad_id=PAD))
    with pytest.raises(ValueError, match="seq_len"):
        list(pack_documents([], 0, eos_id=EOS, pad_id=PAD))
    with pytest.raises(KeyError, match="'fr'"):
        list(pack_documents([([5], "fr")], 3, eos_id=EOS, pad_id=PAD, lang_index={"en": 0}))


def test_attention_mask_blocks_other_documents_and_the_future():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    mask = attention_mask_from_doc_ids(doc_ids)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    m = mask[0, 0]
    assert m[1, 0] and m[3, 2] and m[4, 2] and m[5, 5]  # earlier token of the same document
    assert not m[2, 1] and not m[2, 0] and not m[5, 4]  # across a document boundary
    assert not m[0, 1] and not m[2, 3] and not m[3, 4]  # the future, same document
    assert mask[0, 0].diagonal().all() and mask[1, 0].diagonal().all()
    assert mask[1, 0, 5].tolist() == [False, True, True, True, True, True]
    expected = torch.tensor([[(doc_ids[0, i] == doc_ids[0, j]) and j <= i for j in range(6)] for i in range(6)])
    assert torch.equal(m, expected)
    assert torch.equal(attention_mask_from_doc_ids(doc_ids[0]), mask[:1])

    # With scaled_dot_product_attention, each document sees only itself: same output as running the
    # documents separately with plain causal attention.
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:1])
    for lo, hi in [(0, 2), (2, 5), (5, 6)]:
        ref = F.scaled_dot_product_attention(q[..., lo:hi, :], k[..., lo:hi, :], v[..., lo:hi, :], is_causal=True)
        torch.testing.assert_close(out[..., lo:hi, :], ref)


def test_collate_and_mask_of_packed_rows():
    rows = list(pack_documents(_docs([3, 6, 2, 7], ["en", "de", "en", "fr"]), 6, eos_id=EOS, pad_id=PAD))
    batch = collate_packed(rows)
    assert batch["input_ids"].shape == (len(rows), 6) and len(batch["langs"]) == len(rows)
    mask = attention_mask_from_doc_ids(batch["doc_ids"])
    assert mask.shape == (len(rows), 1, 6, 6)
    # Row 0: doc 0 = 3 tokens + eos (positions 0..3), doc 1 starts at position 4.
    assert batch["doc_ids"][0].tolist() == [0, 0, 0, 0, 1, 1]
    assert not mask[0, 0, 4, 3] and mask[0, 0, 5, 4] and mask[0, 0, 3, 0]


# ------------------------------------------------------------------------------------------------
# mixing


def test_mixer_follows_ratios_and_is_deterministic():
    streams = {"en": [f"en{i}" for i in range(7)], "de": [f"de{i}" for i in range(3)], "sw": ["sw0"]}
    ratios = {"en": 5, "de": 3, "sw": 2}
    first = [x for _, x in zip(range(20000), mix_languages(streams, ratios, seed=1))]
    share = Counter(lang for _, lang in first)
    for lang, w in ratios.items():
        assert share[lang] / 20000 == pytest.approx(w / 10, abs=0.015)
    # Items come from the right stream, in order, cycling.
    assert [item for item, lang in first if lang == "de"][:7] == ["de0", "de1", "de2", "de0", "de1", "de2", "de0"]
    assert first[:500] == [x for _, x in zip(range(500), mix_languages(streams, ratios, seed=1))]
    assert first[:500] != [x for _, x in zip(range(500), mix_languages(streams, ratios, seed=2))]
    # The dict order of the streams does not change the mix.
    reordered = {lang: streams[lang] for lang in reversed(list(streams))}
    assert first[:500] == [x for _, x in zip(range(500), mix_languages(reordered, ratios, seed=1))]


def test_mixer_drop_and_errors():
    streams = {"en": list(range(50)), "de": list(range(100, 110)), "fr": [], "xx": list(range(5))}
    out = list(mix_languages(streams, {"en": 1, "de": 1, "fr": 1, "xx": 0}, seed=0, on_exhausted="drop"))
    assert sorted(item for item, _ in out) == list(range(50)) + list(range(100, 110))
    assert [item for item, lang in out if lang == "de"] == list(range(100, 110))
    assert all(lang != "xx" for _, lang in out)  # weight 0 leaves a language out
    # With "drop", once de ends the rest is en only.
    last_de = max(i for i, (_, lang) in enumerate(out) if lang == "de")
    assert last_de < len(out) - 1
    with pytest.raises(ValueError, match="one-shot"):
        next(mix_languages({"en": iter([1, 2])}, None))
    with pytest.raises(ValueError, match="'fr'"):
        next(mix_languages({"en": [1]}, {"en": 1, "fr": 1}))
    with pytest.raises(ValueError, match="'de'"):
        next(mix_languages({"en": [1], "de": [2]}, {"en": 1}))
    with pytest.raises(ValueError, match="yields no documents"):
        list(zip(range(10), mix_languages({"en": [1], "fr": []}, None)))
    # A callable is restarted for cycling.
    gen = list(zip(range(7), mix_languages({"en": lambda: (i for i in range(3))}, None)))
    assert [item for _, (item, _) in gen] == [0, 1, 2, 0, 1, 2, 0]


def test_language_mixer_with_temperature_ratios_feeds_the_packer():
    streams = {"en": [[11, 12, 13]] * 3, "de": [[21, 22]], "zh": [[31]] * 2}
    sizes = {"en": 900, "de": 90, "zh": 10}
    mixer = LanguageMixer(streams, temperature_ratios(sizes, 0.3), seed=4)
    assert mixer.probabilities == pytest.approx(temperature_ratios(sizes, 0.3))
    first = [x for _, x in zip(range(3000), mixer)]
    assert first == [x for _, x in zip(range(3000), mixer)]  # re-iterable, same mix
    assert sum(mixer.counts.values()) == 3000
    assert mixer.counts["zh"] / 3000 == pytest.approx(mixer.probabilities["zh"], abs=0.03)
    rows = list(pack_documents(first[:20], 8, eos_id=EOS, pad_id=PAD))
    flat = [t for row in rows for t in row["input_ids"].tolist() if t != PAD]
    assert flat == [t for ids, _ in first[:20] for t in ids + [EOS]]
    assert {lang for row in rows for lang in row["langs"]} <= {"en", "de", "zh", None}


# ------------------------------------------------------------------------------------------------
# TextPacker over shards


def test_text_packer_over_text_shards(tmp_path, tok):
    from mmoe.data import write_text

    shards = tmp_path / "shards"
    write_text(sample_text_dir(), shards, samples_per_shard=200)
    packer = TextPacker(shards, tok, 64, shuffle_buffer=0, lang_index={lang: i for i, lang in enumerate(LANGS)})
    rows = list(packer)
    texts = [(text, lang) for lang in LANGS for text in _read_lines(lang)]  # shard order: sorted files, lines
    stream = [t for text, _ in texts for t in tok.encode(text) + [tok.eos_id]]
    assert len(rows) == -(-len(stream) // 64)
    assert [t for row in rows for t in row["input_ids"].tolist()][:len(stream)] == stream
    assert all(row["input_ids"].shape == (64,) for row in rows)
    assert rows[0]["langs"][0] == "ar" and rows[-1]["langs"][0] == "zh"
    assert set(rows[0]["lang_ids"].tolist()) == {0}
    loader = torch.utils.data.DataLoader(packer, batch_size=4, collate_fn=collate_packed)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 64)
    assert torch.equal(batch["labels"][0], rows[0]["labels"])
    pairs = TextPacker([("Hallo Welt.", "de"), ("Bonjour.", "fr")], tok, 32)
    (row,) = list(pairs)
    assert row["langs"] == ["de", "fr", None]
    segments = [tok.decode(row["input_ids"][row["doc_ids"] == k]) for k in range(3)]
    assert segments == ["Hallo Welt.", "Bonjour.", ""]


def test_tokenizer_command(tmp_path):
    """``mmoe tokenizer`` trains and reports the language sampling; a bad source is one clear line."""
    import json as _json
    import subprocess
    import sys

    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "tok" / "spm"
    p = subprocess.run([sys.executable, "-m", "mmoe", "tokenizer", str(sample_text_dir()), str(out),
                        "--vocab-size", "2200", "--temperature", "0.5"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    res = _json.loads(p.stdout.strip().splitlines()[-1])
    assert res["vocab_size"] == 2200 and Path(res["model"]).is_file()
    probs = res["sampling_probability"]
    assert len(probs) == 11 and abs(sum(probs.values()) - 1) < 1e-3
    bad = subprocess.run([sys.executable, "-m", "mmoe", "tokenizer", str(tmp_path / "nothing"), str(out)],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "nothing" in bad.stderr and "Traceback" not in bad.stderr
