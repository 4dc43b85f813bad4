"""Corpus readers, bad input, named corpora and the PTB download path."""

import functools
import hashlib
import http.server
import json
import threading

import pytest

from textvae import data
from textvae.config import DataConfig
from textvae.data import (
    DataError,
    TextDataset,
    build_tokenizer,
    download_ptb,
    load_split,
    read_file,
)


def cfg_for(path, **kw):
    return DataConfig(corpus=None, train_path=str(path), **kw)


def test_blank_lines_are_skipped_and_counted(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("a b c\n\n   \nd e\n")
    corpus = load_split(cfg_for(f), "train")
    assert corpus.texts == ["a b c", "d e"]
    assert corpus.stats["blank_lines"] == 2


@pytest.mark.parametrize(
    "policy, texts, counted",
    [
        ("truncate", ["a b", "c d", "e"], ("truncated", 2)),
        ("drop", ["e"], ("dropped", 2)),
    ],
)
def test_long_sentences_truncated_or_dropped_and_counted(tmp_path, policy, texts, counted):
    f = tmp_path / "c.txt"
    f.write_text("a b x y\nc d z\ne\n")
    corpus = load_split(cfg_for(f, max_length=2, long_policy=policy), "train")
    assert corpus.texts == texts
    assert corpus.stats[counted[0]] == counted[1]


def test_invalid_utf8_names_file_and_line(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"fine line\nalso fine\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"bad.txt, line 3: invalid UTF-8"):
        load_split(cfg_for(f), "train")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="corpus file not found"):
        load_split(cfg_for(tmp_path / "nope.txt"), "train")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no sentences"):
        load_split(cfg_for(empty), "train")


def test_tsv_and_jsonl_with_labels(tmp_path):
    tsv = tmp_path / "c.tsv"
    tsv.write_text("label\ttext\npos\tgood food\nneg\tbad service\n")
    corpus = load_split(cfg_for(tsv, label_field="label"), "train")
    assert corpus.texts == ["good food", "bad service"] and corpus.labels == [1, 0]
    jl = tmp_path / "c.jsonl"
    jl.write_text(
        json.dumps({"text": "a b", "y": 1}) + "\n\n" + json.dumps({"text": "c", "y": 0}) + "\n"
    )
    corpus = load_split(cfg_for(jl, label_field="y"), "train")
    assert (
        corpus.texts == ["a b", "c"]
        and corpus.labels == [1, 0]
        and corpus.stats["blank_lines"] == 1
    )


def test_malformed_records_name_the_line(tmp_path):
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"c.jsonl, line 2: invalid JSON"):
        read_file(jl)
    tsv = tmp_path / "c.tsv"
    tsv.write_text("text\tlabel\na\t1\nb\n")
    with pytest.raises(DataError, match=r"c.tsv, line 3"):
        read_file(tsv, label_field="label")
    with pytest.raises(DataError, match="no column 'sentence'"):
        read_file(tsv, text_field="sentence")


def test_yelp_by_name_labels_from_file_suffix(tmp_path, monkeypatch):
    folder = tmp_path / "yelp_sentiment"
    folder.mkdir()
    (folder / "sentiment.test.0").write_text("bad\nawful place\n")
    (folder / "sentiment.test.1").write_text("great\nlovely\nnice staff\n")
    monkeypatch.setenv("TEXTVAE_DATA_DIR", str(tmp_path))
    cfg = DataConfig(corpus="yelp_sentiment", train_split="test")
    corpus = load_split(cfg, "train")
    assert sorted(zip(corpus.texts, corpus.labels, strict=True)) == sorted(
        [("bad", 0), ("awful place", 0), ("great", 1), ("lovely", 1), ("nice staff", 1)]
    )
    with pytest.raises(DataError, match="sentiment.dev.0"):
        load_split(DataConfig(corpus="yelp_sentiment", valid_split="dev"), "valid")


def test_word_level_tokenizer_round_trip(tmp_path):
    tok = build_tokenizer(["the cat sat", "the dog"], min_frequency=1)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<bos>", "<eos>", "<unk>"]
    ds = TextDataset(["the cat", "the zebra"], tok)
    assert ds.ids[1][1] == tok.unk_token_id and ds.ids[0][-1] == tok.eos_token_id
    tok.save_pretrained(str(tmp_path / "tok"))
    again = data.load_tokenizer(tmp_path / "tok")
    assert (
        again("the cat sat", add_special_tokens=False)["input_ids"]
        == tok("the cat sat", add_special_tokens=False)["input_ids"]
    )
    capped = build_tokenizer(["a a a b b c"], max_vocab=6)
    assert len(capped) == 6  # 4 specials + the 2 most frequent words


def test_literal_unk_in_corpus_keeps_ids_dense():
    """PTB writes unknown words as "<unk>": the WordLevel trainer then gives "<unk>" a second id,
    leaving id 3 unused and an id equal to len(tokenizer) (an embedding IndexError)."""
    tok = build_tokenizer(["the <unk> sat", "a <unk> <unk> ran", "the cat"])
    ids = sorted(tok.get_vocab().values())
    assert ids == list(range(len(tok)))
    assert tok("the <unk> zebra", add_special_tokens=False)["input_ids"][1:] == [3, 3]


def test_batches_are_bucketed_and_a_function_of_seed_and_epoch():
    tok = build_tokenizer([" ".join(["w"] * k) for k in range(1, 30)])
    ds = TextDataset([" ".join(["w"] * (k % 29 + 1)) for k in range(300)], tok)
    a, b = ds.batches(10, True, seed=1, epoch=2), ds.batches(10, True, seed=1, epoch=2)
    assert a == b and a != ds.batches(10, True, seed=1, epoch=3)
    assert sorted(i for batch in a for i in batch) == list(range(300))
    spread = sum(
        max(len(ds.ids[i]) for i in bt) - min(len(ds.ids[i]) for i in bt) for bt in a
    ) / len(a)
    assert spread < 3  # length-bucketed: little padding


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_folder(tmp_path):
    """Serve tmp_path/'served' on 127.0.0.1 at a free port."""
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(served))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_ptb_download_from_local_server_verifies_sha256(tmp_path, http_folder, monkeypatch):
    served, url = http_folder
    sums = {}
    for name in data.PTB_SHA256:
        text = f" sentence of {name}\n another one\n"
        (served / name).write_text(text)
        sums[name] = hashlib.sha256(text.encode()).hexdigest()
    monkeypatch.setattr(data, "PTB_SHA256", sums)
    monkeypatch.setenv("TEXTVAE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TEXTVAE_PTB_URL", url)
    corpus = load_split(DataConfig(corpus="ptb"), "valid")  # not there: downloaded
    assert corpus.texts == ["sentence of ptb.valid.txt", "another one"]
    assert (tmp_path / "data" / "ptb" / "ptb.train.txt").is_file()
    assert not list((tmp_path / "data" / "ptb").glob("*.part"))
    # a corrupted copy on the server is refused and nothing is kept
    (served / "ptb.test.txt").write_text("tampered\n")
    (tmp_path / "data" / "ptb" / "ptb.test.txt").unlink()
    with pytest.raises(DataError, match="sha256"):
        download_ptb(tmp_path / "data", url)
    assert not (tmp_path / "data" / "ptb" / "ptb.test.txt").exists()


def test_ptb_download_offline_says_where_to_put_files(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTVAE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TEXTVAE_PTB_URL", "http://127.0.0.1:9/")  # discard port: refused
    with pytest.raises(DataError, match=r"Put ptb.train.txt.*in .*ptb"):
        load_split(DataConfig(corpus="ptb"), "train")


def test_real_ptb_if_present_matches_published_hashes():
    folder = data.data_dir() / "ptb"
    if not (folder / "ptb.valid.txt").is_file():
        pytest.skip("PTB not under TEXTVAE_DATA_DIR")
    assert data._sha256(folder / "ptb.valid.txt") == data.PTB_SHA256["ptb.valid.txt"]
    corpus = load_split(DataConfig(corpus="ptb"), "valid")
    assert len(corpus.texts) == 3370 and corpus.stats["blank_lines"] == 0
