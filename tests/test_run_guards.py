"""Guards that end a run cleanly: loss spikes, torn metrics logs."""
import json
from types import SimpleNamespace

import pytest

from megatron_rlp.training.metrics import MetricsLogger
from megatron_rlp.training.trainer import LossSpikeGuard, Trainer


def test_spike_guard_is_off_by_default():
    guard = LossSpikeGuard(None)
    assert all(guard.spiked(loss) is None for loss in [2.0] * 6 + [1e6])


def test_spike_guard_needs_history_then_stops_at_factor_times_the_mean():
    guard = LossSpikeGuard(3.0, min_history=5)
    assert guard.spiked(100.0) is None               # no history yet: nothing to compare with
    guard = LossSpikeGuard(3.0, min_history=5)
    for loss in [2.0, 2.2, 1.8, 2.0, 2.0]:
        assert guard.spiked(loss) is None
    assert guard.spiked(5.9) is None                 # below 3 x 2.0
    mean = guard.spiked(30.0)
    assert mean == pytest.approx((2.0 + 2.2 + 1.8 + 2.0 + 2.0 + 5.9) / 6)


def test_a_spike_stops_the_run_with_one_line_naming_the_intact_checkpoint(tmp_path):
    (tmp_path / "iter_0000004").mkdir()
    (tmp_path / "latest").write_text("4\n")
    cfg = SimpleNamespace(checkpoint=SimpleNamespace(save=str(tmp_path)),
                          training=SimpleNamespace(loss_spike_factor=2.0))
    trainer = SimpleNamespace(cfg=cfg, iteration=7,
                              spike_guard=SimpleNamespace(spiked=lambda loss: 1.5))
    with pytest.raises(FloatingPointError) as error:
        Trainer._check_loss_spike(trainer, 40.0)
    message = str(error.value)
    assert "iteration 7: loss 40 exceeds --loss-spike-factor 2.0 x the recent mean 1.5" in message
    assert "newest checkpoint (iteration 4) predates it" in message and "\n" not in message


def test_resume_tolerates_a_torn_last_metrics_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [json.dumps({"iteration": i, "loss": 1.0}) for i in (1, 2, 3)]
    path.write_text("\n".join(records) + '\n{"iteration": 4, "lo')
    MetricsLogger(str(tmp_path), total_iters=10, resume_iteration=2).close()
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["iteration"] for r in kept] == [1, 2]


def test_a_damaged_metrics_record_in_the_middle_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1}\nnot json\n{"iteration": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        MetricsLogger(str(tmp_path), total_iters=10, resume_iteration=2)
