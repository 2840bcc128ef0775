"""A base pretrained on thinking-style documents (megatron_rlp/data/corpus.py, think_share) has
learned the think format: RLP rollouts from it, at random positions of ordinary (think-free)
worked arithmetic, close most thoughts with </think> before the length limit, while the same
model before training closes almost none. (The demo's base is larger and longer trained; its
measured stop rate is in docs/RLP.md.)"""
import pytest
import torch

from conftest import TINY_MODEL_SHAPE

THOUGHT_LEN = 48


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from megatron_rlp.data.corpus import generate_corpus
    from megatron_rlp.data.indexed import optimal_dtype, write_indexed_dataset
    from megatron_rlp.data.tokenizer import build_tokenizer
    from megatron_rlp.train import main

    tok = build_tokenizer()
    docs = [d["text"] for d in generate_corpus(1500, seed=21, think_share=1.0)
            if d.get("thinking") and d["source"] == "arithmetic"]
    root = tmp_path_factory.mktemp("thinking_base")
    prefix = str(root / "think_text_document")
    write_indexed_dataset(prefix, [tok.encode(t) + [tok.eod] for t in docs],
                          dtype=optimal_dtype(tok.vocab_size))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    flags = TINY_MODEL_SHAPE + [
        "--seq-length", "128", "--micro-batch-size", "8", "--lr", "3e-3", "--min-lr", "3e-4",
        "--lr-warmup-iters", "10", "--log-interval", "50", "--save-interval", "0",
        "--data-path", prefix, "--seed", "5"]
    save0, save = str(root / "init"), str(root / "trained")
    try:
        assert main(flags + ["--train-iters", "1", "--lr", "1e-9", "--min-lr", "1e-9",
                             "--save", save0]) == 0
        assert main(flags + ["--train-iters", "100", "--save", save]) == 0
    finally:
        torch.set_num_threads(threads)
    return tok, save0, save


def _stopped_frac(tok, checkpoint: str) -> float:
    import megatron_rlp
    from megatron_rlp.data.corpus import generate_corpus
    from megatron_rlp.inference.decode import CachedDecoder
    from megatron_rlp.config import RLPConfig
    from megatron_rlp.rlp.rollout import make_rollout
    from megatron_rlp.config import ParallelConfig
    from megatron_rlp.training.distributed import init_distributed

    init_distributed(ParallelConfig(), 1)  # rollouts' log-probs read the TP group
    model = megatron_rlp.load_model(checkpoint, device="cpu").model
    plain = [d["text"] for d in generate_corpus(300, seed=77)
             if d["source"] == "arithmetic" and d["quality"] == "high"][:8]
    windows = [(tok.encode(t) + [tok.eod] * 80)[:81] for t in plain]
    text = torch.tensor(windows)
    data = {"tokens": text[:, :-1], "labels": text[:, 1:]}
    rcfg = RLPConfig(rlp_num_thoughts=4, rlp_thought_length=THOUGHT_LEN, rlp_min_prefix=8,
                     rlp_prompt_template="{context}")
    with torch.no_grad():
        out = make_rollout(CachedDecoder(model, tok.vocab_size), model, tok, data, rcfg,
                           seed=3, first_sample=0, pre=[], post=[])
    return float(out.stopped.float().mean())


def test_thought_trained_base_closes_most_of_its_thoughts(trained):
    tok, untrained, save = trained
    trained_frac, untrained_frac = _stopped_frac(tok, save), _stopped_frac(tok, untrained)
    assert trained_frac > 0.5, trained_frac
    assert untrained_frac < 0.2, untrained_frac   # the format is learned, not an accident
