"""The paper presets (examples/rlp_paper.yaml, examples/rpt_paper.yaml) load through the config
system and hold each paper's stated values."""
import os

import pytest

from conftest import REPO_ROOT


def _preset(name):
    from megatron_rlp.config import config_from_dict, load_yaml

    return config_from_dict(load_yaml(os.path.join(REPO_ROOT, "examples", name)))


def test_rlp_preset_has_the_papers_settings():
    cfg = _preset("rlp_paper.yaml")
    r = cfg.rlp
    assert (r.rlp_num_thoughts, r.rlp_thought_length, r.rlp_temperature) == (16, 2048, 0.7)
    assert r.rlp_reward == "info_gain" and r.rlp_kl_beta == 0.0
    o = cfg.optimizer
    assert (o.lr, o.min_lr, o.lr_decay_style, o.lr_warmup_iters) == (1e-6, 1e-6, "constant", 0)
    assert cfg.training.global_batch_size == 512
    prompt = r.rlp_prompt_template
    assert prompt.endswith("\n\n{context}") and "boxed" in prompt and "\n" not in prompt[:-11]


def test_rpt_preset_has_its_settings_and_the_entropy_filter_on():
    r = _preset("rpt_paper.yaml").rlp
    assert (r.rlp_reward, r.rlp_num_thoughts, r.rlp_temperature) == ("rpt", 8, 0.8)
    assert r.rlp_rpt_entropy_filter is not None and r.rlp_rpt_entropy_filter > 0
    assert r.rlp_prompt_template.endswith("{context}")


@pytest.mark.parametrize("name", ["rlp_paper.yaml", "rpt_paper.yaml"])
def test_presets_pass_the_rlp_stage_layout_checks(name):
    cfg = _preset(name)
    # The RLP stage refuses PP > 1 and sequence parallelism.
    assert cfg.parallel.pipeline_model_parallel_size == 1 and not cfg.parallel.sequence_parallel
    assert cfg.training.stage == "rlp"
