"""Prepared stores: what they hold, when they are reused, rebuilt or refused, and batching over them."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rnnkit.cli import app
from rnnkit.config import load_config
from rnnkit.data import builders, prepare
from rnnkit.data.vocab import read_parallel
from rnnkit.data.store import ArrayWriter, Store, bucket_batches
from rnnkit.data.vocab import EOS, UNK, Vocab
from tests.conftest import SAMPLE_TEXT, tiny_lm_config, write_yaml
from tests.test_translation_task import SAMPLE, translation_config

runner = CliRunner()


def stores(tmp_path: Path) -> list[Path]:
    root = tmp_path / "data-cache" / "stores"
    return sorted(root.iterdir()) if root.is_dir() else []


def translation_cfg(tmp_path, **data):
    return load_config(write_yaml(tmp_path / "c.yaml", translation_config(tmp_path, data=data)))


def prepared(tmp_path, workers=1, **data) -> Store:
    from rnnkit.tasks.translation import prepare_data
    return prepare_data(translation_cfg(tmp_path, **data), workers=workers)


def store_bytes(store: Store) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(store.path.iterdir()) if f.name != "manifest.json"}


def test_the_store_holds_what_encoding_in_memory_gives(tmp_path):
    store = prepared(tmp_path, max_len=9, min_freq=2)
    src, tgt = read_parallel(str(SAMPLE / "train.en"), str(SAMPLE / "train.fr"))
    from rnnkit.data.tokenizers import SPECIALS, WordSplitter
    fit = lambda lines: WordSplitter(Vocab.build((t for ln in lines for t in ln.split()), SPECIALS, 2))  # noqa: E731
    s_tok, t_tok = fit(src), fit(tgt)                          # fitting in one process, in memory
    assert store.tokenizer_state("src")["vocab"] == s_tok.vocab.itos     # same words, same order
    assert store.tokenizer_state("tgt")["vocab"] == t_tok.vocab.itos
    pairs = [(s_tok.encode(a), t_tok.encode(b)) for a, b in zip(src, tgt)]
    kept = [(a, b) for a, b in pairs if a and b and len(a) <= 9 and len(b) <= 9]
    sources, targets, keys = store.array("train.src"), store.array("train.tgt"), store.keys("train.src")
    assert len(sources) == len(kept) < len(pairs)
    for i, (a, b) in enumerate(kept):
        assert sources[i].tolist() == a and targets[i].tolist() == b and keys[i] == max(len(a), len(b) + 1)
    assert f"dropped {len(pairs) - len(kept)} of {len(pairs)} sentence pairs" in store.manifest["notes"][0]
    assert store.array("train.src").ids_path.stat().st_size == 2 * sum(len(a) for a, _ in kept)   # uint16


def test_workers_and_chunks_do_not_change_the_store(tmp_path, monkeypatch):
    one = store_bytes(prepared(tmp_path))
    monkeypatch.setenv("RNNKIT_CACHE", str(tmp_path / "another-cache"))
    monkeypatch.setattr(prepare, "CHUNK_LINES", 170)          # ten chunks, two worker processes
    many = prepared(tmp_path, workers=2)
    assert "another-cache" in str(many.path)
    assert len(prepare.cut_lines(str(SAMPLE / "train.en"))[0]) == 10
    assert store_bytes(many) == one
    monkeypatch.setattr(prepare, "CHUNK_LINES", 50_000)
    monkeypatch.setattr(prepare, "CHUNK_BYTES", 100 * 40)     # long lines make chunks of fewer lines
    assert prepare.chunk_lines(str(SAMPLE / "train.en")) == 100
    monkeypatch.setenv("RNNKIT_CACHE", str(tmp_path / "third-cache"))
    assert store_bytes(prepared(tmp_path, workers=1)) == one


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_a_subword_store_holds_sentencepiece_ids(tmp_path, kind):
    store = prepared(tmp_path, src_tokenizer=kind, src_vocab_size=60, max_len=1000)
    from rnnkit.data.tokenizers import tokenizer_from_state
    tok = tokenizer_from_state(store.tokenizer_state("src"))
    lines = (SAMPLE / "train.en").read_text().splitlines()
    sources = store.array("train.src")
    assert [sources[i].tolist() for i in range(50)] == [tok.vocab.encode(tok.split(ln)) for ln in lines[:50]]


def test_a_prepared_store_is_reused_and_another_setting_misses(tmp_path, monkeypatch):
    first = prepared(tmp_path, max_len=9)

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")
    monkeypatch.setattr(builders, "run_jobs", no_tokenising)
    assert prepared(tmp_path, max_len=9).path == first.path
    with pytest.raises(AssertionError, match="tokenised again"):
        prepared(tmp_path, max_len=10)


def test_a_changed_source_a_damaged_store_and_a_killed_prepare(tmp_path, capsys):
    train_src = tmp_path / "train.en"
    train_src.write_bytes((SAMPLE / "train.en").read_bytes())
    first = prepared(tmp_path, train_src=str(train_src))
    content = store_bytes(first)

    ids = first.path / "train.src.ids"
    ids.write_bytes(ids.read_bytes()[:100])                   # damaged: rebuilt with a note
    again = prepared(tmp_path, train_src=str(train_src))
    assert "train.src.ids" in capsys.readouterr().out and store_bytes(again) == content

    (again.path / "manifest.json").unlink()                    # a store without its manifest is no store
    with pytest.raises(Exception, match="not a prepared store"):
        Store.open(again.path)
    assert store_bytes(prepared(tmp_path, train_src=str(train_src))) == content

    dead = first.path.parent / f".{first.path.name}.99999999.tmp"   # what a kill -9 mid-prepare leaves
    dead.mkdir()
    (dead / "train.src.ids").write_bytes(b"\0" * 10)
    lines = train_src.read_text().splitlines()
    train_src.write_text("".join(ln + "\n" for ln in ["zebra " + lines[0]] + lines[1:]))
    changed = prepared(tmp_path, train_src=str(train_src))   # new content, same name: a new store
    assert changed.path != first.path and "zebra" in changed.tokenizer_state("src")["vocab"]
    assert not dead.exists() and len(stores(tmp_path)) == 2


def test_a_full_disk_while_preparing_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def full(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ArrayWriter, "add", full)
    path = write_yaml(tmp_path / "t.yaml", translation_config(tmp_path))
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 2, result.output
    assert "no space left on the device; nothing was kept" in result.output and "Traceback" not in result.output
    assert not any((tmp_path / "data-cache" / "stores").iterdir())
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_bad_line_deep_in_a_later_chunk_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "CHUNK_LINES", 100)
    lines = (SAMPLE / "train.en").read_bytes().split(b"\n")
    lines[249] = b"caf\xe9 " + lines[249]
    bad = tmp_path / "bad.en"
    bad.write_bytes(b"\n".join(lines))
    cfg = translation_config(tmp_path, data={"train_src": str(bad)})
    result = runner.invoke(app, ["train", str(write_yaml(tmp_path / "t.yaml", cfg))])
    assert result.exit_code == 2
    assert f"{bad}: line 250: bytes are not valid UTF-8" in result.output
    assert stores(tmp_path) == []


def test_prepare_info_then_train_reads_the_same_store(tmp_path, monkeypatch):
    path = write_yaml(tmp_path / "t.yaml", translation_config(tmp_path))
    result = runner.invoke(app, ["prepare", str(path), "--workers", "1"])
    assert result.exit_code == 0, result.output
    folder = result.stdout.strip().splitlines()[-1]
    assert Path(folder) == stores(tmp_path)[0]
    info = runner.invoke(app, ["data", "info", folder])
    assert info.exit_code == 0 and "1,600 sequences" in info.output and "train.tgt" in info.output

    monkeypatch.setattr(builders, "run_jobs", lambda *a, **k: (_ for _ in ()).throw(AssertionError("again")))
    assert runner.invoke(app, ["train", str(path)]).exit_code == 0
    assert runner.invoke(app, ["train", str(path), "--resume", "--set", "train.max_steps=8"]).exit_code == 0
    assert len(stores(tmp_path)) == 1                         # resuming with the same tokenizers: the same store

    bad = runner.invoke(app, ["data", "info", str(tmp_path)])
    assert bad.exit_code == 2 and "not a prepared store" in bad.output
    (tmp_path / "labels.tsv").write_text("pos\tgood film\nneg\tbad film\n")
    classify = {"task": "classification", "data": {"train": str(tmp_path / "labels.tsv"),
                                                   "valid": str(tmp_path / "labels.tsv")}}
    other = runner.invoke(app, ["prepare", str(write_yaml(tmp_path / "c.yaml", classify))])
    assert other.exit_code == 2 and "reads its data in memory" in other.output


def split_by_characters(text: str, fractions) -> list[str]:
    n, cuts, at = len(text), [0], 0
    for f in fractions:
        at += int(n * f)
        cuts.append(at)
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


def test_a_language_model_store_holds_the_split_streams(tmp_path, monkeypatch):
    from rnnkit.tasks.language_model import prepare_data
    monkeypatch.setattr(prepare, "CHUNK_LINES", 7)            # many chunks: the streams are joined in order
    text = SAMPLE_TEXT.read_text(encoding="utf-8") + "naïve café\n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    cfg = tiny_lm_config(tmp_path, data={"path": str(tmp_path / "t.txt"), "split": [0.8, 0.15, 0.05]})
    store = prepare_data(load_config(write_yaml(tmp_path / "lm.yaml", cfg)), workers=2)
    parts = split_by_characters(text, [0.8, 0.15, 0.05])
    vocab = Vocab.build(list(parts[0]), [UNK])
    assert store.tokenizer_state("vocab")["vocab"] == vocab.itos
    for name, part in zip(("train", "valid", "test"), parts):
        assert store.stream(name).tolist() == vocab.encode(list(part))


def test_a_word_language_model_store_ends_lines_with_eos(tmp_path):
    from rnnkit.tasks.language_model import prepare_data
    (tmp_path / "a.txt").write_text("the cat sat\n\nthe dog\n")
    (tmp_path / "b.txt").write_text("the bird sat\n")
    cfg = tiny_lm_config(tmp_path, data={"path": None, "train": str(tmp_path / "a.txt"),
                                         "valid": str(tmp_path / "b.txt"), "tokenizer": "word"})
    store = prepare_data(load_config(write_yaml(tmp_path / "lm.yaml", cfg)))
    itos = store.tokenizer_state("vocab")["vocab"]
    assert itos[:3] == [UNK, EOS, "the"]
    assert [itos[i] for i in store.stream("train")] == ["the", "cat", "sat", EOS, EOS, "the", "dog", EOS]
    assert [itos[i] for i in store.stream("valid")] == ["the", UNK, "sat", EOS]


def test_bucket_batches_cover_everything_once_within_budget_and_reproducibly():
    keys = np.array([((i * 37) % 23) + 1 for i in range(500)] + [400])   # one longer than the budget
    for size, budget in ((16, None), (10_000, 120)):
        batches = bucket_batches(keys, size, budget, seed=3)
        assert sorted(int(i) for b in batches for i in b) == list(range(501))
        assert all(len(b) <= size for b in batches)
        if budget:
            assert all(keys[b].max() * len(b) <= budget or len(b) == 1 for b in batches)
            assert any(len(b) == 1 and keys[b[0]] == 400 for b in batches)
        again = bucket_batches(keys, size, budget, seed=3)
        assert all(np.array_equal(a, b) for a, b in zip(batches, again))
        assert not all(np.array_equal(a, b) for a, b in zip(batches, bucket_batches(keys, size, budget, seed=4)))
    spread = [keys[b].max() - keys[b].min() for b in bucket_batches(keys[:500], 16, None, seed=0)]
    assert np.mean(spread) <= 2                                # similar lengths batched together


def test_a_batch_of_stored_indices_splits_across_ranks():
    from rnnkit.training.distributed import Rank, shard
    batch = bucket_batches(np.arange(10), 10, seed=1)[0]
    parts = [shard(batch, Rank(r, 3, r)) for r in range(3)]
    assert [len(p) for p in parts] == [4, 3, 3] and np.array_equal(np.concatenate(parts), batch)


def test_the_cache_can_be_turned_off(tmp_path):
    store = prepared(tmp_path, cache=False)
    assert stores(tmp_path) == [] and store.path.is_dir() and "rnnkit-store-" in str(store.path)


def test_lm_training_windows_come_from_the_mapped_stream(tmp_path):
    from rnnkit.tasks.language_model import LanguageModelTask
    cfg = load_config(write_yaml(tmp_path / "lm.yaml", tiny_lm_config(tmp_path)))
    task = LanguageModelTask(cfg, torch.device("cpu"))
    assert isinstance(task.train_stream, np.memmap)            # not read into the process
    x, y = task._window(task.train_stream, 16)
    assert x.dtype == torch.long and torch.equal(x[:, 1:], y[:, :-1])
    assert x[0].tolist() == task.train_stream[0, 16:32].tolist()


def test_the_shuffle_is_a_permutation_in_constant_memory():
    from rnnkit.data.store import Permutation
    for n in (1, 2, 5, 64, 1000, 4097):
        assert sorted(Permutation(n, 11)(np.arange(n)).tolist()) == list(range(n))
    a, b = Permutation(10_000, 1)(np.arange(10_000)), Permutation(10_000, 2)(np.arange(10_000))
    assert not np.array_equal(a, b) and abs(np.corrcoef(np.arange(10_000), a)[0, 1]) < 0.05
    keys = np.random.default_rng(0).integers(1, 50, 100_000)
    batches = bucket_batches(keys, 32, seed=5)
    held = [v.nbytes for v in vars(batches).values() if isinstance(v, np.ndarray) and v is not batches.keys]
    assert sum(held) == 8 * len(batches)          # two int32 per batch, nothing per sentence
    assert sorted(int(i) for b in batches for i in b) == list(range(100_000))


def test_kill_9_while_preparing_leaves_no_store_and_the_next_prepare_completes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    lines = (SAMPLE / "train.en").read_bytes()
    big_src, big_tgt = tmp_path / "big.en", tmp_path / "big.fr"
    big_src.write_bytes(lines * 150)                      # 240,000 lines: a few seconds of tokenising
    big_tgt.write_bytes((SAMPLE / "train.fr").read_bytes() * 150)
    cfg = write_yaml(tmp_path / "t.yaml", translation_config(tmp_path, data={"train_src": str(big_src),
                                                                            "train_tgt": str(big_tgt)}))
    env = {**os.environ, "RNNKIT_CACHE": str(tmp_path / "data-cache")}
    cmd = [sys.executable, "-m", "rnnkit", "prepare", str(cfg), "--workers", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = tmp_path / "data-cache" / "stores"
    deadline = time.time() + 60
    while not any(root.glob(".*.tmp/part-*")) and time.time() < deadline:   # mid-way: parts being written
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name.startswith(".") for p in root.iterdir()] == [True]      # only the temporary folder
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (store,) = stores(tmp_path)                                            # the leftover is gone
    assert not store.name.startswith(".") and len(Store.open(store).array("train.src")) > 0
