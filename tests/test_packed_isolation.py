"""Packed documents do not leak into each other with --reset-attention-mask (issue 18).

The isolation test: a window holds document A, its <eod>, then document B; A's tokens are
replaced; with the flag B's logits and per-token losses must not change by a single bit (fp32),
and without it they must change. It runs on the chunked SSD scan (and its backward), the causal
conv (the first conv_kernel - 1 tokens of B), a whole model in one process, the cached decoder's
prefill, the mamba_ssm kernel path's plumbing (stand-in kernels on the CPU; the real kernels on a
GPU), and, in two torchrun ranks, TP=2 with two Mamba groups per rank, TP=2 with sequence
parallelism and PP=2 through the trainer's forward step (tests/packed_isolation_worker.py).
The derived inputs equal what megatron-core's GPTDataset builds with the same flags. Bad input
(no <eod> in the tokenizer, an attention path that takes no block mask) is one line, exit 2.
"""
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megatron_rlp.data.document_inputs import DocumentInputs
from megatron_rlp.models.mamba2 import ssd_final_state
from megatron_rlp.models.packed import PackedDocuments, refuse_attention_without_block_mask
from megatron_rlp.models.ssd import causal_depthwise_conv1d, ssd_scan_chunked

from conftest import read_metrics, run_cli
from mp_utils import launch
# The tiny fp32 hybrid (Mamba, attention, MLP; scan chunk 8; built without the flag, which only
# adds the check that its core attention takes block masks) and the CUDA bf16 one.
from test_inference_decode import model  # noqa: F401  (fixture)
from test_mamba2_gpu import cuda_bf16_model  # noqa: F401  (fixture)

VOCAB, EOD = 200, 0
FLAG = "--reset-attention-mask"


def _windows(seq=40, seed=0):
    """[2, seq] token windows with <eod>s (row 0: A = 0..12; row 1: A = 0..7, B = 8..30, C), the
    same windows with A's tokens replaced, and the mask of the positions after A."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (2, seq), generator=g)
    tokens[0, 12] = tokens[1, 7] = EOD
    if seq > 30:
        tokens[1, 30] = EOD
    replaced = tokens.clone()
    replaced[0, :12] = torch.randint(1, VOCAB, (12,), generator=g)
    replaced[1, :7] = torch.randint(1, VOCAB, (7,), generator=g)
    after_a = torch.zeros(2, seq, dtype=torch.bool)
    after_a[0, 13:] = after_a[1, 8:] = True
    return tokens, replaced, after_a


# ---------------------------------------------------------------------- derived inputs


def test_derived_inputs_equal_megatron_gpt_dataset_mask_positions_and_loss_mask():
    """packing.py's boundaries (as the forward step applies them) == megatron-core's
    `_get_ltor_masks_and_position_ids` with reset_attention_mask, reset_position_ids and
    eod_mask_loss, including <eod> first, last and twice in a row."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    tokens = torch.randint(1, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))
    tokens[0, [5, 11]] = EOD
    tokens[1, [0, 23]] = EOD
    tokens[2, [9, 10]] = EOD          # row 3: no <eod> at all
    inputs = DocumentInputs(True, True, True, eod=EOD)
    loss_mask = torch.ones(4, 24)
    position_ids, documents, new_loss_mask = inputs.apply(tokens, loss_mask)
    allowed = documents.attention_mask()
    assert allowed.shape == (4, 1, 24, 24) and allowed.dtype == torch.bool
    for row in range(4):
        masked, mg_loss_mask, mg_positions = _get_ltor_masks_and_position_ids(
            tokens[row], EOD, True, True, True, True)
        assert torch.equal(allowed[row, 0], ~masked[0]), row
        assert torch.equal(position_ids[row], mg_positions), row
        assert torch.equal(new_loss_mask[row], mg_loss_mask), row
    assert torch.equal(loss_mask, torch.ones(4, 24))  # the batch's own mask is not modified
    assert documents.last_document_start().tolist() == [12, 1, 11, 0]


def test_flags_off_leave_the_batch_as_megatron_default():
    tokens = torch.tensor([[3, EOD, 4, 5]])
    loss_mask = torch.ones(1, 4)
    position_ids, documents, out = DocumentInputs.from_config(
        SimpleNamespace(reset_attention_mask=False), None).apply(tokens, loss_mask)
    assert position_ids is None and documents is None and out is loss_mask


@pytest.mark.parametrize("flags", [["reset_attention_mask"], ["eod_mask_loss"],
                                   ["reset_position_ids", "eod_mask_loss"]])
@pytest.mark.parametrize("tokenizer", [None, "raises"], ids=["no_tokenizer", "no_eod"])
def test_a_tokenizer_without_eod_is_refused_naming_the_flag(flags, tokenizer):
    class NoEod:
        source = "words.json"

        @property
        def eod(self):
            raise ValueError("tokenizer 'words.json' has no end-of-document token")

    data_cfg = SimpleNamespace(**{name: True for name in flags})
    with pytest.raises(ValueError) as info:
        DocumentInputs.from_config(data_cfg, NoEod() if tokenizer else None)
    message = str(info.value)
    first = "--" + flags[0].replace("_", "-")
    assert message.startswith(first + ":") and "end-of-document" in message
    assert all("--" + f.replace("_", "-") in message.split("drop")[-1] for f in flags)
    assert "\n" not in message


# ---------------------------------------------------------------------- ops: scan and conv


def _scan_inputs(L=30, seed=4):
    g = torch.Generator().manual_seed(seed)
    b, h, p, groups, n = 2, 4, 8, 2, 16
    x = torch.randn(b, L, h, p, generator=g)
    dt = F.softplus(torch.randn(b, L, h, generator=g) - 1.0)
    A = -torch.exp(torch.rand(h, generator=g) * 2.0)
    B, C = torch.randn(2, b, L, groups, n, generator=g)
    return x, dt, A, B, C, torch.randn(h, generator=g)


@pytest.mark.parametrize("start", [5, 8, 13], ids=["mid_chunk", "on_chunk_edge", "second_chunk"])
def test_scan_outputs_and_state_of_a_document_ignore_the_previous_one_exactly(start):
    """Changing everything the scan reads at A's positions (x, dt, B, C) leaves B's outputs and
    the final state bit-identical with seq_idx (within-chunk sums restart at B: see
    ssd._along_chunk), and changes them without."""
    x, dt, A, B, C, D = _scan_inputs()
    seq = (torch.arange(30) >= start).long().expand(2, -1)
    other = [t.clone() for t in (x, dt, B, C)]
    g = torch.Generator().manual_seed(9)
    for t in other:
        t[:, :start] = torch.rand(t[:, :start].shape, generator=g) + 0.1
    for documents in (True, False):
        idx = seq if documents else None
        y1, s1 = ssd_scan_chunked(x, dt, A, B, C, 8, D, seq_idx=idx)
        y2, s2 = ssd_scan_chunked(other[0], other[1], A, other[2], other[3], 8, D, seq_idx=idx)
        same = torch.equal(y1[:, start:], y2[:, start:]) and torch.equal(s1, s2)
        assert same == documents, (documents, float((y1[:, start:] - y2[:, start:]).abs().max()))


def test_scan_backward_sends_no_gradient_from_a_document_to_the_previous_one():
    """d(B's outputs)/d(A's inputs) is exactly zero with seq_idx: the hand-written backward
    restarts its suffix sums at document starts too."""
    x, dt, A, B, C, D = (t.requires_grad_() for t in _scan_inputs())
    seq = (torch.arange(30) >= 13).long().expand(2, -1)
    y, state = ssd_scan_chunked(x, dt, A, B, C, 8, D, seq_idx=seq)
    weights = torch.randn(y[:, 13:].shape, generator=torch.Generator().manual_seed(2))
    ((y[:, 13:] * weights).sum() + state.square().sum()).backward()
    for name, t in (("x", x), ("dt", dt), ("B", B), ("C", C)):
        assert torch.equal(t.grad[:, :13], torch.zeros_like(t.grad[:, :13])), name
        assert t.grad[:, 13:].abs().max() > 0, name


def test_conv_first_kernel_minus_one_tokens_of_a_document_ignore_the_previous_one():
    """The taps of B's first d_conv - 1 outputs reach back into A: with seq_idx they add exact
    zeros (only A's last d_conv - 1 inputs are changed here), without they do not; the conv
    state after the window keeps only the last document's inputs."""
    d_conv, start = 4, 9
    g = torch.Generator().manual_seed(5)
    xBC = torch.randn(2, 6, 16, generator=g)
    weight, bias = torch.randn(6, 1, d_conv, generator=g), torch.randn(6, generator=g)
    other = xBC.clone()
    other[..., start - (d_conv - 1):start] += 1.0
    seq = (torch.arange(16) >= start).long().expand(2, -1)
    first = slice(start, start + d_conv - 1)
    out1, _ = causal_depthwise_conv1d(xBC, weight, bias, seq_idx=seq)
    out2, _ = causal_depthwise_conv1d(other, weight, bias, seq_idx=seq)
    assert torch.equal(out1[..., first], out2[..., first])
    plain1, _ = causal_depthwise_conv1d(xBC, weight, bias)
    plain2, _ = causal_depthwise_conv1d(other, weight, bias)
    assert (plain1[..., first] - plain2[..., first]).abs().min() > 0  # every tap reached A
    # B alone gives the same outputs (zero history = start of a sequence)
    alone, _ = causal_depthwise_conv1d(xBC[..., start:], weight, bias)
    torch.testing.assert_close(out1[..., start:], alone, rtol=1e-6, atol=1e-6)
    seq_short = torch.tensor([[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0]])
    _, state = causal_depthwise_conv1d(xBC[..., :7], weight, bias, seq_idx=seq_short)
    assert torch.equal(state[0, :, :2], torch.zeros(6, 2)) and torch.equal(
        state[0, :, 2:], xBC[0, :, 5:7])
    assert torch.equal(state[1], xBC[1, :, 3:7])


def test_final_state_helper_with_documents_is_the_last_documents_state():
    x, dt, A, B, C, _ = _scan_inputs()
    seq = torch.tensor([[0] * 11 + [1] * 19, [0] * 30])
    init = torch.randn(2, 4, 8, 16)
    _, expected = ssd_scan_chunked(x, dt, A, B, C, 8, initial_state=init, seq_idx=seq)
    got = ssd_final_state(x, dt, A, B, init, seq_idx=seq)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- whole model, 1 process


@torch.no_grad()
def _logits_and_losses(model, tokens, isolated):
    documents = PackedDocuments.from_tokens(tokens, EOD) if isolated else None
    labels = torch.roll(tokens, -1, dims=1)
    return (model(tokens, None, None, packed_seq_params=documents),
            model(tokens, None, None, labels=labels, packed_seq_params=documents))


def test_replacing_a_document_leaves_the_next_ones_logits_and_loss_bit_identical(model):
    tokens, replaced, after_a = _windows()
    labels_b = torch.roll(tokens, -1, dims=1)
    for isolated in (True, False):
        logits1, loss1 = _logits_and_losses(model, tokens, isolated)
        logits2, _ = _logits_and_losses(model, replaced, isolated)
        documents = PackedDocuments.from_tokens(replaced, EOD) if isolated else None
        with torch.no_grad():
            loss2 = model(replaced, None, None, labels=labels_b, packed_seq_params=documents)
        same = (torch.equal(logits1[after_a], logits2[after_a])
                and torch.equal(loss1[after_a], loss2[after_a]))
        assert same == isolated, (isolated, float((logits1 - logits2)[after_a].abs().max()))
    # Isolated is also right: B's logits are those of B run on its own.
    logits, _ = _logits_and_losses(model, tokens, True)
    with torch.no_grad():
        alone = model(tokens[:1, 13:], None, None)
    torch.testing.assert_close(logits[0, 13:], alone[0], rtol=1e-5, atol=1e-5)


def test_replacing_the_tokens_under_the_conv_taps_leaves_the_next_documents_start_unchanged(
        model):
    """Only A's last conv_kernel - 1 tokens before its <eod> change: B's first conv_kernel - 1
    positions (the ones whose conv taps reach into A) keep their logits bit for bit."""
    tokens, _, _ = _windows()
    d_conv = model.decoder.layers[0].mixer.d_conv
    changed = tokens.clone()
    changed[0, 12 - (d_conv - 1):12] = (changed[0, 12 - (d_conv - 1):12] + 1) % (VOCAB - 1) + 1
    first = slice(13, 13 + d_conv - 1)
    on1, _ = _logits_and_losses(model, tokens, True)
    on2, _ = _logits_and_losses(model, changed, True)
    off1, _ = _logits_and_losses(model, tokens, False)
    off2, _ = _logits_and_losses(model, changed, False)
    assert torch.equal(on1[0, first], on2[0, first])
    assert (off1[0, first] - off2[0, first]).abs().max() > 1e-3


def test_document_mask_attention_equals_attention_within_each_document(model):
    """SDPACoreAttention with PackedDocuments == plain softmax attention run per document; the
    no-document call keeps SDPA's is_causal fast path (no mask tensor). (`model`: for megatron's
    parallel state.)"""
    from unittest import mock

    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_rlp.models.attention import SDPACoreAttention

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                               num_query_groups=2, kv_channels=8, attention_dropout=0.0,
                               use_cpu_initialization=True)
    core = SDPACoreAttention(config, 1, AttnMaskType.causal, "self")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(10, 2, 4, 8, generator=g)
    k, v = torch.randn(2, 10, 2, 2, 8, generator=g)
    ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 7 + [1] * 2 + [2]])
    out = core(q, k, v, None, packed_seq_params=PackedDocuments(seq_idx=ids))
    for row in range(2):
        for doc in ids[row].unique():
            pos = (ids[row] == doc).nonzero()[:, 0]
            qd, kd, vd = (t[pos, row].transpose(0, 1) for t in (q, k, v))  # [heads, n, 8]
            kd, vd = kd.repeat_interleave(2, 0), vd.repeat_interleave(2, 0)
            scores = qd @ kd.transpose(1, 2) / 8 ** 0.5
            n = len(pos)
            scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -1e30)
            expected = (scores.softmax(-1) @ vd).transpose(0, 1).reshape(n, 32)
            torch.testing.assert_close(out[pos, row], expected, rtol=1e-5, atol=1e-5)
    with mock.patch.object(F, "scaled_dot_product_attention",
                           wraps=F.scaled_dot_product_attention) as sdpa:
        core(q, k, v, None)
    assert sdpa.call_args.kwargs["is_causal"] is True
    assert "attn_mask" not in sdpa.call_args.kwargs
    with pytest.raises(ValueError, match=r"seq_idx \(2, 9\) does not cover 10 queries"):
        core(q, k, v, None, packed_seq_params=PackedDocuments(seq_idx=ids[:, :9]))


def test_masked_attention_runs_on_the_fused_cpu_kernel():
    """The document mask keeps torch's fused (flash) CPU kernel: no [s, s] math fallback."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_rlp.models.attention import causal_sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 16, 8, generator=g)
    mask = PackedDocuments(seq_idx=(torch.arange(16) >= 6).long().expand(2, -1)).attention_mask()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if the flash kernel cannot run
        out = causal_sdpa(q, k, v, 0.3, is_causal=False, attn_mask=mask)
    torch.testing.assert_close(out[:, :, 6:], causal_sdpa(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:],
                                                          0.3), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- cached decoder


def test_decoder_prefill_and_steps_match_the_isolated_forward(model):
    """prefill(eod=) == the training forward with PackedDocuments; steps continue the last
    document only; a fed <eod> starts a fresh document (== a fresh prefill of what follows)."""
    from megatron_rlp.inference.decode import CachedDecoder, full_logits

    decoder = CachedDecoder(model, VOCAB)
    tokens, _, _ = _windows(seq=24)
    logits, cache = decoder.prefill(tokens[:, :20], capacity=24, all_logits=True, eod=EOD)
    torch.testing.assert_close(logits, full_logits(model, tokens[:, :20], VOCAB, eod=EOD),
                               rtol=1e-5, atol=1e-5)
    assert cache.doc_start.tolist() == [13, 8] and not cache.after_eod.any()
    full = full_logits(model, tokens, VOCAB, eod=EOD)
    for t in range(20, 24):
        step = decoder.step(tokens[:, t], cache)
        torch.testing.assert_close(step, full[:, t], rtol=1e-5, atol=2e-5)
    # Row 0 alone with A replaced: the same state, so the same next logits.
    _, replaced, _ = _windows(seq=24)
    other_logits, _ = decoder.prefill(replaced[:1, :20], eod=EOD)
    torch.testing.assert_close(other_logits[0, -1], logits[0, -1], rtol=1e-5, atol=1e-5)
    # Feed <eod>, then a token: it starts a new document.
    _, cache = decoder.prefill(tokens[:, :20], capacity=22, eod=EOD)
    decoder.step(torch.full((2,), EOD), cache)
    assert cache.after_eod.all()
    nxt = decoder.step(torch.tensor([17, 17]), cache)
    fresh, _ = decoder.prefill(torch.tensor([[17]]))
    torch.testing.assert_close(nxt, fresh[:, -1].expand(2, -1), rtol=1e-5, atol=2e-5)
    assert cache.doc_start.tolist() == [21, 21]
    # Row selection carries the document fields.
    picked = cache.index_rows(torch.tensor([1, 1, 0]))
    assert picked.doc_start.tolist() == [21, 21, 21] and picked.eod == EOD


# ---------------------------------------------------------------------- mamba_ssm kernel path


def _stand_in_kernels(chunk_size):
    """CPU stand-ins for (causal_conv1d_fn, mamba_chunk_scan_combined) computing with the torch
    functions, and checking what the real kernels require of their inputs."""
    calls = []

    def conv(x, weight, bias, seq_idx=None, activation=None):
        assert activation == "silu"
        if seq_idx is not None:  # causal_conv1d: seq_idx only with channel-last x
            assert x.stride(1) == 1 and seq_idx.dtype == torch.int32 and seq_idx.is_contiguous()
        calls.append(("conv", seq_idx is not None))
        out, _ = causal_depthwise_conv1d(x, weight[:, None, :], bias, seq_idx=seq_idx)
        return F.silu(out)

    def scan(x, dt, A, B, C, chunk, D=None, z=None, dt_bias=None, dt_softplus=False,
             initial_states=None, return_final_states=False, seq_idx=None):
        assert chunk == chunk_size and dt_softplus and not return_final_states
        if seq_idx is not None:
            assert seq_idx.dtype == torch.int32 and seq_idx.is_contiguous()
        calls.append(("scan", seq_idx is not None))
        y, _ = ssd_scan_chunked(x, F.softplus(dt.float() + dt_bias), A, B, C, chunk, D,
                                initial_state=initial_states, seq_idx=seq_idx)
        return y

    return (conv, scan), calls


def test_kernel_path_hands_seq_idx_to_both_kernels_and_matches_the_torch_path(model):
    mixer = model.decoder.layers[0].mixer
    kernels, calls = _stand_in_kernels(mixer.chunk_size)
    hidden = torch.randn(30, 2, 64, generator=torch.Generator().manual_seed(3))
    seq = torch.tensor([[0] * 11 + [1] * 19, [0] * 5 + [1] * 20 + [2] * 5])
    documents = PackedDocuments(seq_idx=seq)
    with torch.no_grad():
        torch_out, _ = mixer(hidden, packed_seq_params=documents)
        torch_state = mixer.forward_with_state(hidden, seq_idx=seq)
        mixer._fast_kernels = lambda activations: kernels
        try:
            kernel_out, _ = mixer(hidden, packed_seq_params=documents)
            kernel_state = mixer.forward_with_state(hidden, seq_idx=seq)
        finally:
            del mixer._fast_kernels
    assert calls == [("conv", True), ("scan", True)] * 2
    torch.testing.assert_close(kernel_out, torch_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(kernel_state, torch_state):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_real_kernels_with_documents_match_the_torch_path_on_a_gpu(cuda_bf16_model):
    """mamba_ssm / causal_conv1d with seq_idx == the torch path (bf16 tolerance), and B's outputs
    stay put when A changes. Not bit for bit here: mamba_ssm's scan takes decays as differences
    of within-chunk cumulative sums that include A's dt, so bf16 outputs may move by rounding."""
    mixer = cuda_bf16_model.decoder.layers[0].mixer
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(100, 2, 128, device="cuda", generator=g).to(torch.bfloat16)
    seq = (torch.arange(100, device="cuda") >= 45).long().expand(2, -1).contiguous()
    documents = PackedDocuments(seq_idx=seq)
    changed = hidden.clone()
    changed[:45] = torch.randn(45, 2, 128, device="cuda", generator=g).to(torch.bfloat16)

    def rel(a, b):
        return float((a.float() - b.float()).abs().max() / b.float().abs().max())

    results = {}
    with torch.no_grad():
        for fast in (True, False):
            mixer.use_fast_kernels = fast
            results[fast] = (mixer(hidden, packed_seq_params=documents)[0],
                             mixer(changed, packed_seq_params=documents)[0],
                             mixer.forward_with_state(hidden, seq_idx=seq)[2])
        mixer.use_fast_kernels = True
        leaking = mixer(hidden)[0][45:], mixer(changed)[0][45:]
    (fast_a, fast_b, fast_ssm), (torch_a, _, torch_ssm) = results[True], results[False]
    assert rel(fast_a, torch_a) < 2e-2
    assert rel(fast_b[45:], fast_a[45:]) < 1e-2 < rel(*leaking)
    torch.testing.assert_close(fast_ssm, torch_ssm, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------- bad input


def test_an_attention_that_takes_no_block_mask_is_refused(model, monkeypatch):
    """A spec with megatron's DotProductAttention (no PackedDocuments), and SDPA restricted to
    flash attention on a CUDA host: one line naming the flag and the alternative."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_rlp.config import config_from_dict
    from megatron_rlp.models.hybrid import build_model
    from megatron_rlp.models.spec import hybrid_stack_spec

    spec = hybrid_stack_spec()
    attention = spec.submodules.attention_layer.submodules.self_attention.submodules
    attention.core_attention = DotProductAttention
    cfg = config_from_dict(dict(
        num_layers=2, hybrid_override_pattern="M*", hidden_size=32, ffn_hidden_size=64,
        num_attention_heads=4, num_query_groups=2, mamba_num_heads=4, mamba_head_dim=8,
        mamba_state_dim=8, mamba_num_groups=2, reset_attention_mask=True))
    with pytest.raises(ValueError, match=r"^--reset-attention-mask: core attention "
                                         r"DotProductAttention cannot take a block-diagonal "
                                         r"document mask; .* or drop --reset-attention-mask$"):
        build_model(cfg, VOCAB, stack_spec=spec)
    refuse_attention_without_block_mask(model)  # ours passes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    flags = torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_math_sdp(False)
    try:
        with pytest.raises(ValueError, match=r"^--reset-attention-mask: torch SDPA is restricted "
                                             r"to flash attention.*enable_mem_efficient_sdp"):
            refuse_attention_without_block_mask(model)
    finally:
        torch.backends.cuda.enable_mem_efficient_sdp(flags[0])
        torch.backends.cuda.enable_math_sdp(flags[1])


def test_cli_refuses_the_flag_with_a_tokenizer_without_eod(tiny_flags, tmp_path):
    """A tokenizer.json with no end-of-document token: one line, exit 2, before any work."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    path = str(tmp_path / "tokenizer.json")
    Tokenizer(WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(path)
    save = str(tmp_path / "run")
    result = run_cli(tiny_flags + ["--train-iters", "2", "--save", save, FLAG,
                                   "--tokenizer-type", "TokenizerFile", "--tokenizer-model", path])
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"{FLAG}: the tokenizer" in errors[0], result.stderr[-2000:]
    assert "or drop --reset-attention-mask" in errors[0]
    assert not os.path.exists(os.path.join(save, "latest"))


# ---------------------------------------------------------------------- end to end


def test_cli_trains_with_the_three_flags(tiny_flags, tmp_path):
    """The flags reach the trainer's forward step (training and validation): a short run."""
    save = str(tmp_path / "run")
    result = run_cli(tiny_flags + ["--train-iters", "2", "--save", save, FLAG,
                                   "--reset-position-ids", "--eod-mask-loss",
                                   "--eval-interval", "2", "--eval-iters", "1"])
    assert result.returncode == 0, result.stderr[-2000:]
    last = read_metrics(save)[-1]
    assert last["iteration"] == 2 and 0 < last["loss"] < 20 and 0 < last["valid_loss"] < 20


@pytest.mark.slow
def test_tp2_sp_and_pp2_keep_documents_isolated_exactly(tmp_path):
    """2 torchrun ranks: TP=2 (2 Mamba groups per rank), TP=2 + SP, PP=2 via PretrainStage."""
    result = launch([], 2, str(tmp_path), timeout=300, module="tests.packed_isolation_worker")
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    assert sorted(results) == ["pp2", "tp2", "tp2_sp"]
    for layout, per_rank in results.items():
        reported = [r for r in per_rank if r]
        assert len(reported) == (1 if layout == "pp2" else 2), layout  # PP: the last stage
        for r in reported:
            assert r["on_loss_equal"] and r["on_loss_max_diff"] == 0.0, (layout, r)
            assert not r["off_loss_equal"] and r["off_loss_max_diff"] > 1e-3, (layout, r)
            if layout != "pp2":
                assert r["on_logits_equal"] and not r["off_logits_equal"], (layout, r)
