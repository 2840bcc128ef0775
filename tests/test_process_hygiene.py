"""Nothing outlives a killed run (checkpoint writers, Manager processes, preprocessing workers), and
preprocessing a giant document stays within bounded memory."""
import os
import queue
import signal
import subprocess
import sys
import time

import numpy as np
import psutil

from conftest import REPO_ROOT, TINY_MODEL_FLAGS


def _alive(pids):
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _watch_children(proc, until, timeout):
    """Pids of every descendant of `proc` seen (polled every 50 ms) until `until()` or timeout."""
    parent, seen = psutil.Process(proc.pid), set()
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not until():
        try:
            seen.update(c.pid for c in parent.children(recursive=True))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    return seen


def _kill_leftovers(pids):
    for pid in _alive(pids):  # only processes this test started (descendants of its child)
        os.kill(pid, signal.SIGKILL)


def _latest(save):
    try:
        with open(os.path.join(save, "latest")) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def test_sigkilled_trainer_leaves_no_child_process_alive(embedded_dir, tmp_path):
    # Before: every save forked writer processes and started a spawn Manager plus its resource
    # tracker, which survived a SIGKILL of the trainer (3.1 GB RSS of orphans in one session).
    save = str(tmp_path / "run")
    trainer = subprocess.Popen(
        [sys.executable, "-m", "megatron_rlp.train", *TINY_MODEL_FLAGS, "--embedded-data-dir",
         embedded_dir, "--train-iters", "500", "--save", save, "--save-interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO_ROOT,
        env=dict(os.environ, TORCHDYNAMO_DISABLE="1"))
    seen = set()
    try:
        seen = _watch_children(trainer, lambda: _latest(save) >= 3, timeout=240)
        assert trainer.poll() is None, trainer.stderr.read()[-2000:]
        assert _latest(save) >= 3, "the run saved fewer than 3 checkpoints while watched"
        trainer.kill()  # SIGKILL: no handler, no cleanup code runs in the trainer
        trainer.wait()
        time.sleep(5)
        assert _alive(seen) == [], [psutil.Process(p).cmdline() for p in _alive(seen)]
    finally:
        if trainer.poll() is None:
            trainer.kill()
        _kill_leftovers(seen)


def test_threaded_checkpoint_writer_writes_every_bucket_and_reports_a_failed_one(tmp_path):
    from megatron_rlp.training.ckpt_writer import write_buckets_in_threads

    ok = [(str(tmp_path / f"__0_{i}.distcp"), f"__0_{i}.distcp", ([], [])) for i in range(2)]
    results = queue.Queue()
    write_buckets_in_threads([], False, 0, ok, results)
    assert results.get_nowait() == {0: [], 1: []}
    assert all(os.path.isfile(path) for path, _, _ in ok)

    bad = ok[:1] + [(str(tmp_path / "missing" / "__0_1.distcp"), "__0_1.distcp", ([], []))]
    write_buckets_in_threads([], False, 0, bad, results)
    assert isinstance(results.get_nowait(), FileNotFoundError)


_POOL_SCRIPT = """
import sys
from megatron_rlp.data.preprocess import Chunk, ordered_results
text = ('word ' * 2_000_000).encode()
chunks = (Chunk("giant.jsonl", [(i, b'{"text": "' + text + b'"}')]) for i in range(100))
for _ in ordered_results(chunks, 2, ("EmbeddedTokenizer", None, ["text"], True, "uint16")):
    pass
"""


def test_sigkilled_preprocessing_takes_its_workers_with_it(tmp_path):
    # Before: a worker busy on a giant document kept tokenising it as an orphan.
    runner = subprocess.Popen([sys.executable, "-c", _POOL_SCRIPT], cwd=REPO_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent, seen = psutil.Process(runner.pid), set()
    try:
        def workers_busy():
            kids = [c for c in parent.children() if "spawn_main" in " ".join(c.cmdline())]
            return len(kids) == 2 and all(c.cpu_times().user > 3 for c in kids)

        seen = _watch_children(runner, workers_busy, timeout=120)
        assert runner.poll() is None and len(seen) >= 2, "the worker pool did not start"
        runner.kill()
        runner.wait()
        time.sleep(5)
        assert _alive(seen) == []
    finally:
        if runner.poll() is None:
            runner.kill()
        _kill_leftovers(seen)


_RSS_SCRIPT = """
import resource, sys
import numpy as np
from megatron_rlp.data import preprocess
from megatron_rlp.data.corpus import generate_corpus
from megatron_rlp.data.tokenizer import build_tokenizer

tok = build_tokenizer()
docs = "\\n".join(d["text"] for d in generate_corpus(50, 3))
text = (docs * (2_000_000 // len(docs) + 1))[:2_000_000]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
flat, lengths = preprocess.encode_documents(tok, [text], tok.eod, np.dtype(np.uint16))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, int(lengths[0]), flat.size)
"""


def test_a_giant_document_is_tokenised_in_bounded_memory():
    # Before: one 2 MB document grew RSS by ~430 MB (one 50 MB JSONL line: 10 GB). In pieces the
    # growth is ~75 MB and barely depends on the length (a 50 MB line: 0.70 GB peak for the tool,
    # 0.46 GB of it imports).
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True,
                       cwd=REPO_ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    growth, length, size = map(int, r.stdout.split())
    assert length == size > 400_000  # the whole document was encoded, <eod> included
    assert growth < 150 * 2**20, f"RSS grew {growth / 2**20:.0f} MB"


def test_long_documents_tokenise_in_pieces_to_the_same_ids_as_whole(monkeypatch):
    from megatron_rlp.data import preprocess
    from megatron_rlp.data.corpus import generate_corpus
    from megatron_rlp.data.tokenizer import build_tokenizer

    monkeypatch.setattr(preprocess, "PIECE_CHARS", 300)
    monkeypatch.setattr(preprocess, "BATCH_CHARS", 700)
    tok = build_tokenizer()
    texts = ["\n\n".join(d["text"] for d in generate_corpus(12, s)) for s in range(3)]
    texts += ["", "short one", "  leading  spaces   and\ttabs\n\n\n12 + 34 = 46  "]
    assert all(len(list(preprocess.split_long_text(t))) > 5 for t in texts[:3])
    flat, lengths = preprocess.encode_documents(tok, texts, tok.eod, np.dtype(np.uint16))
    # Megatron-LM's rule: an empty text stays empty, without <eod>.
    whole = [tok.encode(t) + [tok.eod] if t else [] for t in texts]
    assert lengths.tolist() == [len(w) for w in whole]
    assert flat.tolist() == [i for w in whole for i in w]


def test_text_without_whitespace_is_cut_hard_and_loses_nothing():
    from megatron_rlp.data.preprocess import split_long_text

    text = "x" * 1000 + " tail"
    pieces = list(split_long_text(text, limit=256))
    assert "".join(pieces) == text
    assert [len(p) for p in pieces[:3]] == [256, 256, 256]
    assert all(len(p) <= 256 for p in pieces)
