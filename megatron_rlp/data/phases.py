"""Phased pretraining data: `--data-phases BLEND.yaml` switches blends inside one run.

Megatron changes a blend by exiting and relaunching with a new `--data-path`, and its resumed
sampler then drops and repeats samples. Here the whole schedule is one data source:

    global sample i  ->  (phase k, local index j) = blend.locate(i, budgets)
                     ->  phase k's megatron-core BlendedDataset[j]

Each phase is built by `build_pretraining_dataset` (megatron-core's own blending and shuffling)
with seed `--seed + k`, so a phase's sample order is deterministic and independent of the other
phases. The trainer addresses data by consumed samples, so resuming mid-phase or exactly at the
boundary reads the same samples as an uninterrupted run; nothing else needs saving. A fingerprint
of the schedule rides in the checkpoint, and resuming with a different schedule is refused
(that is exactly how Megatron drops and repeats samples).

Blend file (YAML; written by tools/build_phase_blend.py, or by hand):

    format: megatron-rlp-phase-blend/1
    phases:
      - name: phase1                 # logged as `phase` in metrics.jsonl
        tokens: 600000               # budget: round(tokens / seq_length) samples, whole batches
        data_path: [0.7, web_medium_text_document, 0.3, math_high_text_document]
      - name: phase2
        tokens: 400000
        data_path: [1.0, math_high_text_document]
    sources:                         # optional: the builder's table, keyed by source name
      math_high: {path: math_high_text_document, valid_path: valid/math_high_text_document, ...}

Relative prefixes are resolved against the blend file's folder. If the run needs more samples
than the phases hold, the last phase continues (with a note at start-up); if fewer, the run ends
early in the schedule.

Validation: a `sources` entry may give `valid_path`, the held-out prefix of that source. When any
does, those prefixes are the run's validation split, one `valid_loss/<name>` per entry under the
table's name, whatever phase the run is in (a source phase 2 drops is still measured, which
shows what the switch costs); see megatron_rlp/data/validation.py. Otherwise validation comes
from --valid-data-path or the embedded split, as without --data-phases.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import yaml

from megatron_rlp.data import blend as blend_lib
from megatron_rlp.device import is_rank_zero

BLEND_FORMAT = "megatron-rlp-phase-blend/1"


@dataclass(frozen=True)
class Phase:
    name: str
    tokens: int
    data_path: list          # Megatron weight/prefix list, prefixes absolute


def _read_blend_file(path: str) -> dict:
    where = f"--data-phases {path!r}"
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        raise ValueError(f"{where}: file not found; build one with tools/build_phase_blend.py") \
            from None
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: not valid YAML ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("phases"), list) or not doc["phases"]:
        raise ValueError(f"{where}: expected a mapping with a non-empty 'phases' list")
    fmt = doc.get("format", BLEND_FORMAT)
    if fmt != BLEND_FORMAT:
        raise ValueError(f"{where}: format {fmt!r} is not {BLEND_FORMAT!r}")
    return doc


def _resolve(base: str, prefix: str) -> str:
    return prefix if os.path.isabs(prefix) else os.path.normpath(os.path.join(base, prefix))


def load_blend(path: str) -> list[Phase]:
    """Parse and validate a blend file; raise ValueError naming the field and the fix."""
    return _phases_of(_read_blend_file(path), path)


def _phases_of(doc: dict, path: str) -> list[Phase]:
    from megatron_rlp.data.datasets import parse_data_path

    where = f"--data-phases {path!r}"
    base = os.path.dirname(os.path.abspath(path))
    phases, seen = [], set()
    for k, entry in enumerate(doc["phases"]):
        at = f"{where} phases[{k}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{at}: expected a mapping with name, tokens, data_path")
        missing = [key for key in ("name", "tokens", "data_path") if key not in entry]
        if missing:
            raise ValueError(f"{at}: missing {', '.join(missing)}")
        name, tokens = str(entry["name"]), entry["tokens"]
        if name in seen:
            raise ValueError(f"{at}: phase name {name!r} repeats; names must be unique")
        seen.add(name)
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
            raise ValueError(f"{at}: tokens={tokens!r} must be a positive integer")
        try:
            prefixes, weights = parse_data_path([str(x) for x in entry["data_path"]])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{at}: data_path: {e}") from None
        prefixes = [_resolve(base, p) for p in prefixes]
        data_path = prefixes if weights is None else [
            x for w, p in zip(weights, prefixes) for x in (str(w), p)]
        phases.append(Phase(name, tokens, data_path))
    return phases


@dataclass(frozen=True)
class ValidSource:
    name: str                # as the blend file's `sources` table names it
    prefix: str              # its held-out prefix, absolute
    phases: tuple            # names of the phases that train on it (empty: none does)


def load_valid_sources(path: str) -> list[ValidSource]:
    """The validation split the blend file declares: every `sources` entry with a `valid_path`
    (the held-out prefix of that source), in the table's order; [] when no entry gives one."""
    from megatron_rlp.data.datasets import parse_data_path

    doc = _read_blend_file(path)
    table = doc.get("sources") or {}
    if not isinstance(table, dict):
        raise ValueError(f"--data-phases {path!r}: 'sources' must map each source's name to its "
                         "entry (path, valid_path, ...)")
    base = os.path.dirname(os.path.abspath(path))
    readers: dict = {}  # training prefix -> phases that read it
    for phase in _phases_of(doc, path):
        for prefix in parse_data_path(phase.data_path)[0]:
            readers.setdefault(prefix, []).append(phase.name)
    out = []
    for name, entry in table.items():
        if not isinstance(entry, dict) or "valid_path" not in entry:
            continue
        valid = entry["valid_path"]
        if not isinstance(valid, str) or not valid.strip():
            raise ValueError(f"--data-phases {path!r} sources.{name}: valid_path={valid!r} must "
                             "be the prefix of the source's held-out .bin/.idx")
        # parse_data_path forgives a trailing .bin/.idx, as it does for the phases' prefixes.
        trained = (_resolve(base, parse_data_path(str(entry["path"]))[0][0])
                   if "path" in entry else None)
        prefix = _resolve(base, parse_data_path(valid)[0][0])
        twin = next((v.name for v in out if v.prefix == prefix), None)
        if twin is not None:
            raise ValueError(f"--data-phases {path!r} sources.{name}: valid_path {valid!r} is "
                             f"also the valid_path of {twin!r}; each source needs its own")
        out.append(ValidSource(str(name), prefix, tuple(readers.get(trained, ()))))
    return out


class PhasedSource:
    """The data source the trainer reads: `batch(start, count)` and `phase(consumed)`."""

    def __init__(self, phases: list[Phase], datasets: list, budgets: list[int], seq_length: int,
                 seed: int):
        assert len(phases) == len(datasets) == len(budgets)
        self.phases = phases
        self.datasets = datasets
        self.budgets = budgets
        self.seq_length = seq_length
        self.seed = seed

    def sample(self, index: int) -> dict:
        k, j = blend_lib.locate(index, self.budgets)
        return self.datasets[k][j]

    def batch(self, start: int, count: int) -> dict:
        samples = [self.sample(start + i) for i in range(count)]
        return {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
                for key in ("tokens", "labels", "loss_mask")}

    def phase_index(self, consumed_samples: int) -> int:
        """Phase of the last consumed sample (of the first sample before any is consumed): the
        trainer asks after a step, and the step's samples belong to this phase."""
        return blend_lib.locate(max(consumed_samples - 1, 0), self.budgets)[0]

    def phase(self, consumed_samples: int) -> str:
        return self.phases[self.phase_index(consumed_samples)].name

    def samples_per_phase(self, consumed_samples: int) -> dict:
        counts = blend_lib.samples_per_phase(consumed_samples, self.budgets)
        return {p.name: n for p, n in zip(self.phases, counts)}

    def fingerprint(self) -> str:
        """Identifies the sample schedule: phases, budgets, blends, seed, sequence length."""
        spec = [[p.name, n, [os.path.basename(x) for x in p.data_path]]
                for p, n in zip(self.phases, self.budgets)]
        blob = json.dumps([spec, self.seq_length, self.seed], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def notes(self, total_samples: int, global_batch_size: int) -> list[str]:
        """Start-up lines for what would otherwise pass unnoticed: blend weights megatron-core
        will rescale, and phases this run never reaches."""
        from megatron_rlp.data.datasets import parse_data_path

        out = []
        for p in self.phases:
            _, weights = parse_data_path(p.data_path)
            total = sum(weights) if weights else 1.0
            if abs(total - 1.0) > 1e-6:
                scaled = ", ".join(f"{w / total:.4g}" for w in weights)
                out.append(f"note: --data-phases phase {p.name!r}: blend weights sum to "
                           f"{total:g}, not 1; they are normalised to {scaled}")
        for p, start in zip(self.phases, blend_lib.phase_starts(self.budgets)):
            if start >= total_samples:
                need = start // global_batch_size + 1
                out.append(f"note: --data-phases phase {p.name!r} is never reached: it starts at "
                           f"sample {start:,} and this run reads {total_samples:,} samples; "
                           f"--train-iters {need} or more reaches it")
        return out

    def summary(self, total_samples: int) -> str:
        """Start-up table: per phase and source, samples, tokens and effective epochs."""
        from megatron_rlp.data.indexed import count_tokens

        wanted = blend_lib.samples_per_phase(total_samples, self.budgets)
        starts = blend_lib.phase_starts(self.budgets)
        lines = [f"data phases: {len(self.phases)} phases, {sum(self.budgets):,} samples in the "
                 f"blend, run reads {total_samples:,} samples of {self.seq_length} tokens"]
        sizes, reads = {}, {}
        for p, ds, n, start, want in zip(self.phases, self.datasets, self.budgets, starts, wanted):
            extra = f", extended by {want - n:,} past its budget" if want > n else ""
            lines.append(f"  {p.name}: samples [{start:,}, {start + n:,}) budget {n:,}, "
                         f"run reads {want:,}{extra}")
            draws = ds.draws_per_source(want) if want > 0 else np.zeros(len(ds.prefixes), int)
            for prefix, d in zip(ds.prefixes, draws):
                size = sizes.setdefault(prefix, count_tokens(prefix))
                reads[prefix] = reads.get(prefix, 0) + int(d) * self.seq_length
                lines.append(f"    {os.path.basename(prefix):<40} {int(d):>9,} samples "
                             f"{int(d) * self.seq_length:>12,} tokens "
                             f"{int(d) * self.seq_length / size:>7.3f} epochs")
        lines.append("  effective epochs per source over the run:")
        for prefix, used in reads.items():
            lines.append(f"    {os.path.basename(prefix):<40} {used / sizes[prefix]:>7.3f}")
        return "\n".join(lines)


def build_phased_source(phases: list[Phase], tokenizer, seq_length: int, global_batch_size: int,
                        total_samples: int, seed: int,
                        cache_dir: Optional[str] = None) -> PhasedSource:
    """One megatron-core dataset per phase, each sized for what the run reads from it."""
    from megatron_rlp.data.datasets import build_pretraining_dataset

    per_step = seq_length * global_batch_size
    for p in phases:  # phase_sample_budgets would silently round such a budget up to one step
        if p.tokens < per_step:
            raise ValueError(
                f"--data-phases phase {p.name!r}: tokens={p.tokens:,} is less than one optimizer "
                f"step ({per_step:,} tokens = --seq-length {seq_length} x global batch "
                f"{global_batch_size}); raise its budget or merge it into a neighbouring phase")
    budgets = blend_lib.phase_sample_budgets([p.tokens for p in phases], seq_length,
                                             global_batch_size)
    wanted = blend_lib.samples_per_phase(total_samples, budgets)
    datasets = []
    for k, (p, n, want) in enumerate(zip(phases, budgets, wanted)):
        # Size every phase for at least its budget: its sample order must not depend on how far a
        # particular run goes (megatron-core's shuffle depends on the requested size).
        size = max(n, want)
        try:
            # Every rank calls this: megatron's builder indexes on rank 0 first, then the rest.
            ds = build_pretraining_dataset(
                p.data_path, seq_length=seq_length, num_samples=size, seed=seed + k,
                tokenizer=tokenizer, split="train", cache_dir=cache_dir)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"--data-phases phase {p.name!r}: {e}") from None
        datasets.append(ds)
    return PhasedSource(phases, datasets, budgets, seq_length, seed)


# ----------------------------------------------------------------------------------------------
# attached to a run by megatron_rlp/extensions.py
# ----------------------------------------------------------------------------------------------
def phased_source_builder(cfg, tokenizer) -> Optional[PhasedSource]:
    """The training source when --data-phases is given (else None: the run's --data-path)."""
    from megatron_rlp.data.run_data import data_cache_dir, run_global_batch_size

    path = cfg.phases.data_phases
    if not path:
        return None
    phases = load_blend(path)
    gbs = run_global_batch_size(cfg)
    total = cfg.training.train_iters * gbs
    source = build_phased_source(phases, tokenizer, cfg.training.seq_length, gbs, total,
                                 cfg.training.seed, cache_dir=data_cache_dir(cfg))
    if is_rank_zero():
        print(source.summary(total), flush=True)
        for note in source.notes(total, gbs):
            print(note, flush=True)
        if cfg.data.data_path and not cfg.data.valid_data_path and load_valid_sources(path):
            print(f"note: --data-phases {path!r} gives valid_path entries, but --data-path "
                  "without --valid-data-path turns validation off; drop --data-path "
                  "(--data-phases replaces it) to evaluate them", flush=True)
    return source


class PhaseCallback:
    """Announces phase switches, logs samples per phase, and guards resume against a changed
    schedule (the fingerprint is saved with the trainer's state)."""

    KEY = "data_phases_fingerprint"

    def __init__(self, source: PhasedSource):
        self.source = source
        self._last: Optional[int] = None

    def on_train_start(self, trainer) -> None:
        saved = trainer.extra_state.get(self.KEY)
        mine = self.source.fingerprint()
        if saved is not None and saved != mine and trainer.consumed_samples > 0:
            raise ValueError(
                f"--data-phases: the checkpoint was trained with a different phase schedule "
                f"(fingerprint {saved}, now {mine}); resuming would drop and repeat samples. "
                "Resume with the original blend file, or start a new stage with --finetune")
        trainer.extra_state[self.KEY] = mine
        self._last = self.source.phase_index(trainer.consumed_samples + 1)

    def on_iteration_start(self, trainer, iteration: int) -> None:
        k = self.source.phase_index(trainer.consumed_samples + 1)  # phase of the next sample
        if self._last is not None and k != self._last and is_rank_zero():
            print(f"data phase: {self.source.phases[self._last].name} -> "
                  f"{self.source.phases[k].name} starting iteration {iteration + 1} "
                  f"(sample {trainer.consumed_samples:,})", flush=True)
        self._last = k

    def after_optimizer_step(self, trainer, iteration: int) -> None:
        pass

    def metrics(self, trainer) -> dict:
        counts = self.source.samples_per_phase(trainer.consumed_samples)
        return {f"samples_{name}": n for name, n in counts.items()}

    def checkpoint_components(self) -> dict:
        return {}


def phase_callbacks(cfg, model, tokenizer, train_source) -> list:
    """The phase callback when the training source is a phase schedule."""
    return [PhaseCallback(train_source)] if isinstance(train_source, PhasedSource) else []
