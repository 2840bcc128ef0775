"""The core sections of a run's config: model, parallel, optimizer, training, data, checkpoint.

Checks that involve a single section live in its `__post_init__` (checks across sections live in
`RunConfig.__post_init__`, run.py). Every check raises `ValueError` naming the flag, the value,
the rule and the fix (`fields.fail`), so a bad launch fails with one line before any work is done.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .fields import LAYER_SYMBOLS, arg, check_hybrid_pattern, fail


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@dataclass
class ModelConfig:
    num_layers: int = arg(6, "Number of layers (one per character of the hybrid pattern).")
    hybrid_override_pattern: str = arg(
        "M*M-M-", "Layer kinds, one character per layer: M Mamba2, * attention, - MLP.")
    hidden_size: int = arg(128, "Model width.")
    ffn_hidden_size: int = arg(512, "MLP inner width (squared-ReLU, no gate).")
    num_attention_heads: int = arg(4, "Attention query heads.")
    num_query_groups: int = arg(2, "Key/value heads (GQA groups).")
    kv_channels: Optional[int] = arg(None, "Attention head dim (default hidden/heads).")
    mamba_num_heads: int = arg(8, "Mamba2 heads.")
    mamba_head_dim: int = arg(32, "Mamba2 head dim (Mamba width = heads x head dim).")
    mamba_state_dim: int = arg(32, "Mamba2 SSM state size.")
    mamba_num_groups: int = arg(2, "Mamba2 B/C groups.")
    mamba_conv_kernel: int = arg(4, "Mamba2 causal conv width.")
    mamba_chunk_size: int = arg(64, "Chunk length of the SSD scan (power of two).")
    norm_epsilon: float = arg(1e-5, "RMSNorm epsilon.")
    init_method_std: float = arg(0.02, "Std of the normal init of linear weights.")
    make_vocab_size_divisible_by: int = arg(128, "Pad the vocab to a multiple of this.")

    def __post_init__(self):
        check_hybrid_pattern(self.num_layers, self.hybrid_override_pattern)
        for name in ("hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "mamba_num_heads", "mamba_head_dim", "mamba_state_dim",
                     "mamba_num_groups", "mamba_conv_kernel", "make_vocab_size_divisible_by"):
            if getattr(self, name) <= 0:
                fail(name, getattr(self, name), "must be positive", "pass a positive integer")
        if self.num_attention_heads % self.num_query_groups:
            fail("num_query_groups", self.num_query_groups,
                 f"must divide --num-attention-heads={self.num_attention_heads}",
                 "choose query groups that divide the heads")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            fail("num_attention_heads", self.num_attention_heads,
                 f"must divide --hidden-size={self.hidden_size} when --kv-channels is unset",
                 "set --kv-channels or change the head count")
        if self.mamba_num_heads % self.mamba_num_groups:
            fail("mamba_num_groups", self.mamba_num_groups,
                 f"must divide --mamba-num-heads={self.mamba_num_heads}",
                 "choose Mamba groups that divide the Mamba heads")
        if not _is_power_of_two(self.mamba_chunk_size):
            fail("mamba_chunk_size", self.mamba_chunk_size, "must be a power of two",
                 "use e.g. 64, 128 or 256")

    @property
    def layer_kinds(self) -> list[str]:
        return [LAYER_SYMBOLS[c] for c in self.hybrid_override_pattern]


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = arg(1, "Tensor-parallel ranks.")
    pipeline_model_parallel_size: int = arg(1, "Pipeline stages.")
    num_layers_per_virtual_pipeline_stage: Optional[int] = arg(
        None, "Layers per virtual stage (interleaved 1F1B).")
    sequence_parallel: bool = arg(False, "Shard norms/dropout activations along the sequence.")
    use_distributed_optimizer: bool = arg(False, "Shard optimizer state over data-parallel ranks.")
    overlap_grad_reduce: Optional[bool] = arg(
        None, "Overlap the data-parallel gradient reduce with the backward pass in buckets "
        "(default: on with CUDA, off on CPU).")

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(self, name) < 1:
                fail(name, getattr(self, name), "must be >= 1", "pass a positive integer")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            fail("sequence_parallel", True, "needs --tensor-model-parallel-size > 1",
                 "drop --sequence-parallel or raise TP")


@dataclass
class OptimizerConfig:
    lr: float = arg(3e-3, "Peak learning rate.")
    min_lr: float = arg(3e-4, "Learning rate at the end of decay.")
    lr_decay_style: str = arg("cosine", "Schedule after warmup.",
                              choices=("cosine", "linear", "constant", "WSD"))
    lr_warmup_iters: int = arg(20, "Linear warmup iterations.")
    lr_decay_iters: Optional[int] = arg(None, "Iterations of warmup+decay (default --train-iters).")
    lr_wsd_decay_iters: Optional[int] = arg(
        None, "WSD: length of the final decay (default 20%% of --lr-decay-iters).")
    lr_wsd_decay_style: str = arg("linear", "WSD decay shape.",
                                  choices=("linear", "cosine", "exponential", "minus_sqrt"))
    weight_decay: float = arg(0.1, "AdamW decoupled weight decay.")
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.95, "AdamW beta2.")
    adam_eps: float = arg(1e-8, "AdamW epsilon.")
    clip_grad: float = arg(1.0, "Clip the global grad norm to this (0 disables).")

    def __post_init__(self):
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            fail("min_lr", self.min_lr, f"need 0 <= --min-lr <= --lr={self.lr} and --lr > 0",
                 "fix the learning rates")
        if self.lr_warmup_iters < 0:
            fail("lr_warmup_iters", self.lr_warmup_iters, "must be >= 0", "pass 0 or more")


@dataclass
class TrainingConfig:
    micro_batch_size: int = arg(8, "Sequences per micro-batch per data-parallel rank.")
    global_batch_size: Optional[int] = arg(
        None, "Sequences per optimizer step (default micro-batch x data-parallel size).")
    seq_length: int = arg(128, "Tokens per sequence.")
    train_iters: int = arg(200, "Optimizer steps to run (in total, across resumes).")
    seed: int = arg(1234, "Seed for init, data order and dropout.")
    bf16: bool = arg(False, "Train in bf16 with fp32 master weights.")
    log_interval: int = arg(10, "Log every this many iterations.")
    wandb_project: Optional[str] = arg(
        None, "Also log every metrics.jsonl record to this Weights & Biases project (needs the "
        "wandb extra; WANDB_MODE=offline writes the run without a network).")
    wandb_exp_name: Optional[str] = arg(None, "W&B run name (required with --wandb-project).")
    wandb_save_dir: Optional[str] = arg(None, "Folder for W&B's run files (default <save>/wandb).")
    wandb_entity: Optional[str] = arg(None, "W&B entity (user or team) that owns the project.")
    eval_interval: int = arg(0, "Evaluate on the validation split every N iterations (0: never).")
    eval_iters: int = arg(4, "Micro-batches per evaluation, on the validation blend and again "
                             "on each of its sources (valid_loss/<source>).")
    exit_signal_handler: bool = arg(True, "On SIGTERM, save a checkpoint and exit cleanly.")
    exit_interval: Optional[int] = arg(
        None, "Save and exit (code 0) after an iteration divisible by this (Megatron-LM's flag).")
    exit_duration_in_mins: Optional[float] = arg(
        None, "Save and exit (code 0) at the first iteration boundary after this many minutes "
        "since the process started; leave a margin for the save before a job's wall-clock limit.")
    loss_spike_factor: Optional[float] = arg(
        None, "Stop (without saving) when an iteration's loss exceeds this factor times the mean "
        "of the previous iterations' losses (off by default: a finite jump can be legitimate).")
    stage: str = arg("pretrain", "What to train: next-token pretraining or an RLP stage.",
                     choices=("pretrain", "rlp"))

    def global_batch(self, data_parallel_size: int) -> int:
        """Sequences per optimizer step at this DP size (default: one micro-batch per DP rank);
        it must split into whole micro-batches on every DP rank."""
        per_step = self.micro_batch_size * data_parallel_size
        gbs = self.global_batch_size or per_step
        if gbs % per_step:
            raise ValueError(
                f"--global-batch-size={gbs} is not a multiple of --micro-batch-size x "
                f"data-parallel size = {self.micro_batch_size} x {data_parallel_size}; "
                "adjust the batch sizes")
        return gbs

    def __post_init__(self):
        if self.loss_spike_factor is not None and not self.loss_spike_factor > 1:
            fail("loss_spike_factor", self.loss_spike_factor, "must be > 1",
                 "pass e.g. 3 (stop at 3x the running mean loss) or drop the flag")
        for name in ("exit_interval", "exit_duration_in_mins"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                fail(name, getattr(self, name), "must be > 0", "pass a positive number or "
                     "drop the flag")
        for name in ("micro_batch_size", "seq_length", "train_iters", "log_interval"):
            if getattr(self, name) < 1:
                fail(name, getattr(self, name), "must be >= 1", "pass a positive integer")


@dataclass
class DataConfig:
    data_path: list = arg([], "Megatron blend: PREFIX or 'W1 PREFIX1 W2 PREFIX2 ...' "
                              "(default: the embedded corpus, generated on first use).")
    valid_data_path: list = arg([], "Validation prefix(es) (default: embedded validation split).")
    tokenizer_type: str = arg("EmbeddedTokenizer", "Tokenizer kind.")
    tokenizer_model: Optional[str] = arg(None, "Path to a tokenizer.json for file tokenizers.")
    data_cache_path: Optional[str] = arg(None, "Where dataset index caches go (default <save>/cache).")
    embedded_data_dir: Optional[str] = arg(
        None, "Where the embedded corpus is generated (default ~/.cache/megatron_rlp/embedded).")
    # Packed documents (docs/PACKED_DOCUMENTS.md): Megatron-LM's names and meanings.
    reset_attention_mask: bool = arg(
        False, "Isolate the documents packed in a window: block-diagonal causal attention and "
        "Mamba2 conv/SSM state reset after each <eod> (needs an <eod> in the tokenizer).")
    reset_position_ids: bool = arg(
        False, "Restart position ids after each <eod>. The hybrid model has no position "
        "embedding, so this changes its outputs only if one is added.")
    eod_mask_loss: bool = arg(
        False, "Drop the loss at <eod> positions (the prediction made at each <eod>, whose target "
        "is the next document's first token), as Megatron-LM's --eod-mask-loss does.")


@dataclass
class CheckpointConfig:
    save: Optional[str] = arg(None, "Directory for checkpoints, metrics.jsonl and logs.")
    load: Optional[str] = arg(None, "Checkpoint directory to resume or start from.")
    save_interval: int = arg(0, "Save every N iterations (0: only at the end).")
    no_load_optim: bool = arg(False, "Load weights only (start a new optimizer).")
    no_load_rng: bool = arg(False, "Do not restore RNG states.")
    finetune: bool = arg(False, "Load weights only and reset iteration to 0 (new stage).")
    ckpt_step: Optional[int] = arg(
        None, "Load this iteration of --load instead of the one 'latest' names (e.g. the "
        "newest intact one when the latest is damaged).")
    no_ckpt_verify: bool = arg(
        False, "On load, check only file names and sizes against manifest.json, not SHA-256 "
        "sums (saves reading every byte of a huge checkpoint; misses bit flips).")
    override_opt_param_scheduler: bool = arg(
        False, "On resume, take the learning-rate schedule from the command line where it "
        "differs from the checkpoint's (the schedule continues from the saved iteration).")
    use_checkpoint_opt_param_scheduler: bool = arg(
        False, "On resume, keep the checkpoint's learning-rate schedule where the command line "
        "differs.")
    async_save: bool = arg(
        False, "Write checkpoints in the background while training continues; 'latest' moves "
        "once every rank's files are complete.")
    keep_last_n_checkpoints: Optional[int] = arg(
        None, "Keep only the newest K checkpoints in --save (default: keep all).")
    dry_run: bool = arg(False, "Build on the meta device, print sizes and memory, exit.")

    def __post_init__(self):
        if self.ckpt_step is not None and self.ckpt_step < 0:
            fail("ckpt_step", self.ckpt_step, "must be an iteration number (>= 0)",
                 "pass an iteration that was saved")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            fail("override_opt_param_scheduler", True,
                 "contradicts --use-checkpoint-opt-param-scheduler",
                 "pass one: the command line's schedule or the checkpoint's")
        if self.keep_last_n_checkpoints is not None and self.keep_last_n_checkpoints < 1:
            fail("keep_last_n_checkpoints", self.keep_last_n_checkpoints, "must be >= 1",
                 "pass how many of the newest checkpoints to keep, or drop the flag")
        if self.ckpt_step is not None and not self.load:
            fail("ckpt_step", self.ckpt_step, "names an iteration of --load, which is not set",
                 "add --load DIR")
