#!/usr/bin/env python
"""Build a two-phase pretraining blend (YAML for `--data-phases`) from a manifest of sources.

    python tools/build_phase_blend.py --manifest data/tiers/manifest.json \\
        --total-tokens 2000000 --output data/two_phase_blend.yaml \\
        [--phase-split 0.6 0.4] [--epoch-cap high=4 medium=2 low=1] \\
        [--phase1-tier-weight high=1 medium=1 low=1] [--phase2-tier-weight high=1 medium=0.25 low=0] \\
        [--phase2-category-boost math=2 code=2]

Manifest: JSON or YAML, `{"sources": [{name, category, tier, tokens, path}, ...]}` (what
tools/estimate_quality.py writes); relative paths are relative to the manifest's folder.
`--valid-manifest` (the same form; e.g. estimate_quality.py run on held-out documents with the
training tiers' `--classifier`) gives each source of the same name a `valid_path`: the run then
reports `valid_loss/<name>` per source (megatron_rlp/data/validation.py).

Phase 1 is diverse (blend weight proportional to tokens x phase-1 tier weight: the natural
distribution by default); phase 2 upweights high tiers and math/code. Each source's epochs over
the run (tokens read / tokens it has) must stay within its tier's cap; a budget that breaks a cap
is rejected, naming the sources and the largest budget that fits. Prints a table of tokens and
epochs per source per phase, and writes the YAML atomically (see megatron_rlp/data/phases.py for
the schema; prefixes are written relative to the YAML's folder).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

try:
    import megatron_rlp  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml

from megatron_rlp.data import blend


def _mapping(flag: str, items: list) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key:
            raise ValueError(f"{flag} {item!r}: expected NAME=NUMBER, e.g. high=4")
    return out


def get_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--manifest", required=True, help="JSON/YAML list of sources")
    p.add_argument("--total-tokens", required=True, type=float,
                   help="tokens the whole run reads (e.g. train-iters x global-batch x seq-length)")
    p.add_argument("--output", required=True, help="blend YAML to write")
    p.add_argument("--phase-split", type=float, nargs=2, default=list(blend.DEFAULT_SPLIT),
                   metavar=("P1", "P2"), help="fraction of tokens per phase")
    fmt = lambda d: [f"{k}={v:g}" for k, v in d.items()]  # noqa: E731
    p.add_argument("--epoch-cap", nargs="+", default=fmt(blend.DEFAULT_EPOCH_CAPS),
                   metavar="TIER=EPOCHS", help="most epochs a source of each tier may be read")
    p.add_argument("--phase1-tier-weight", nargs="+",
                   default=fmt(blend.DEFAULT_PHASE1_TIER_WEIGHTS), metavar="TIER=W",
                   help="phase-1 weight multiplier per tier (x source tokens)")
    p.add_argument("--phase2-tier-weight", nargs="+",
                   default=fmt(blend.DEFAULT_PHASE2_TIER_WEIGHTS), metavar="TIER=W",
                   help="phase-2 weight multiplier per tier (x source tokens)")
    p.add_argument("--phase1-category-boost", nargs="*", default=[], metavar="CATEGORY=X",
                   help="phase-1 multiplier per category")
    p.add_argument("--phase2-category-boost", nargs="*",
                   default=fmt(blend.DEFAULT_PHASE2_CATEGORY_BOOST), metavar="CATEGORY=X",
                   help="phase-2 multiplier per category")
    p.add_argument("--valid-manifest", help="held-out tiers, matched to --manifest by source "
                   "name: per-source validation (`valid_path` in the blend)")
    p.add_argument("--phase-names", nargs=2, default=["phase1", "phase2"],
                   help="names logged as `phase` in metrics.jsonl")
    return p.parse_args(argv)


def read_manifest(path: str, flag: str = "--manifest") -> list[blend.Source]:
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)  # YAML is a superset of JSON
    except FileNotFoundError:
        raise ValueError(f"{flag} {path!r}: file not found") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{flag} {path!r}: not valid JSON/YAML ({e})") from None
    entries = doc.get("sources") if isinstance(doc, dict) else doc
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{flag} {path!r}: expected {{'sources': [...]}} with at least one "
                         "source")
    base = os.path.dirname(os.path.abspath(path))
    sources = []
    for k, e in enumerate(entries):
        missing = [key for key in ("name", "tier", "tokens", "path")
                   if not isinstance(e, dict) or key not in e]
        if missing:
            raise ValueError(f"{flag} {path!r} sources[{k}]: missing {', '.join(missing)}")
        prefix = e["path"] if os.path.isabs(e["path"]) else os.path.join(base, e["path"])
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise ValueError(f"{flag} {path!r} source {e['name']!r}: {prefix + ext} not "
                                 "found; run tools/estimate_quality.py or tools/preprocess_data.py")
        try:
            sources.append(blend.Source(str(e["name"]), str(e.get("category", e["name"])),
                                        str(e["tier"]), int(e["tokens"]), prefix))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{flag} {path!r} sources[{k}]: {err}") from None
    return sources


def blend_document(plan: blend.BlendPlan, output: str, held_out: Optional[dict] = None) -> dict:
    """The YAML payload: per-phase Megatron `weight prefix` lists, budgets, and the table."""
    out_dir = os.path.dirname(os.path.abspath(output))
    paths = {s.name: os.path.relpath(s.path, out_dir) for s in plan.sources}
    phases = []
    for p in plan.phases:
        data_path = []
        for s in plan.sources:
            if s.name in p.shares:
                data_path += [round(p.shares[s.name], 8), paths[s.name]]
        phases.append({"name": p.name, "tokens": int(p.tokens), "data_path": data_path})
    sources = {s.name: {"category": s.category, "tier": s.tier, "tokens": s.tokens,
                        "path": paths[s.name], "epoch_cap": plan.epoch_caps[s.tier],
                        "epochs": {p.name: round(plan.epochs(s.name, p.name), 4)
                                   for p in plan.phases},
                        "total_epochs": round(plan.epochs(s.name), 4)}
               for s in plan.sources}
    for name, prefix in (held_out or {}).items():  # source name -> held-out prefix
        sources[name]["valid_path"] = os.path.relpath(prefix, out_dir)
    from megatron_rlp.data.phases import BLEND_FORMAT

    return {"format": BLEND_FORMAT, "total_tokens": plan.total_tokens, "phases": phases,
            "sources": sources}


def main(argv: Optional[list] = None) -> int:
    a = get_args(argv)
    try:
        total = a.total_tokens
        if total != int(total) or total <= 0:
            raise ValueError(f"--total-tokens={total:g} must be a positive whole number")
        caps = _mapping("--epoch-cap", a.epoch_cap)
        phases = [
            blend.PhaseSpec(a.phase_names[0], a.phase_split[0],
                            _mapping("--phase1-tier-weight", a.phase1_tier_weight),
                            _mapping("--phase1-category-boost", a.phase1_category_boost)),
            blend.PhaseSpec(a.phase_names[1], a.phase_split[1],
                            _mapping("--phase2-tier-weight", a.phase2_tier_weight),
                            _mapping("--phase2-category-boost", a.phase2_category_boost)),
        ]
        if a.phase_names[0] == a.phase_names[1]:
            raise ValueError(f"--phase-names {a.phase_names}: the two names must differ")
        sources = read_manifest(a.manifest)
        held_out = ({s.name: s.path for s in read_manifest(a.valid_manifest, "--valid-manifest")}
                    if a.valid_manifest else {})
        plan = blend.plan_phases(sources, int(total), phases, caps)
    except ValueError as e:
        print(f"build_phase_blend: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(blend.format_table(plan))
    print(f"largest budget within every epoch cap: "
          f"{blend.max_total_tokens(sources, phases, caps):,} tokens")
    names = {s.name for s in sources}
    for name in sorted(set(held_out) - names):
        print(f"note: --valid-manifest source {name!r} is not in --manifest; left out (build "
              "both with the same tiers: --classifier of the first)", flush=True)
        del held_out[name]
    for name in sorted(names - set(held_out) if held_out else ()):
        print(f"note: --valid-manifest has no held-out {name!r}: no valid_loss/{name}",
              flush=True)
    doc = blend_document(plan, a.output, held_out)
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    tmp = f"{a.output}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("# written by tools/build_phase_blend.py; use with --data-phases\n")
        yaml.safe_dump(doc, f, sort_keys=False, default_flow_style=None, width=120)
    os.replace(tmp, a.output)
    print(json.dumps({"output": os.path.abspath(a.output), "total_tokens": plan.total_tokens,
                      "phases": {p.name: p.tokens for p in plan.phases}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
