#!/usr/bin/env python
"""RLP (Hatamizadeh et al., 2025) vs FLOP-matched continued pretraining (CPT) at CPU scale.

    python examples/experiments/rlp_vs_cpt.py [--quick] [--out DIR] [--seeds 1 2 3]

1. base: pretrain from scratch, next-token prediction, on the embedded corpus blended with its
   thinking-style documents (worked arithmetic/algebra with `<think> ... </think>` before results,
   megatron_rlp/data/corpus.py), so the base knows the think format and can close a thought.
   One base, shared by both arms and all seeds.
2. Both arms then read the same documents: the embedded training split's arithmetic and algebra
   documents with every thought removed (ordinary text; the model must supply the thinking).
   rlp: --stage rlp (info-gain reward vs the EMA teacher, G thoughts of <= --thought-len tokens,
   T = 0.7, contexts inside one document). cpt: next-token training for the RLP run's
   `ntp_equivalent_tokens` (megatron_rlp/rlp/flops.py, the paper's T_flop), rounded up to whole
   batches. Constant LR for both.
3. Learning rate: the same grid for both arms, run at the first seed; each arm keeps its best LR
   by think-then-answer accuracy on a validation split. The other seeds run at those LRs.
4. Test evaluation (held-out documents of another corpus seed, think-free), both ways:
   - next-token loss without thinking (result digits after '=' vs ordinary tokens), and
   - think-then-answer accuracy on every worked step's result (think_eval.py: greedy thought,
     then greedy answer; exact match), next to the no-think accuracy, the stop rate, and the
     information gain of a thought at result vs ordinary positions.
   Paired by seed: RLP - CPT, mean ± std over seeds; resolved when beyond two standard errors.

Outputs in --out: report.md, metrics.json, reward.png, accuracy.png, runs/, data/.
"""
from __future__ import annotations

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
import think_eval  # noqa: E402

CLASSES = ("result", "ordinary")
EVAL_SEED = 4242  # corpus seed of the held-out evaluation documents (never trained on)


def scale(quick: bool) -> dict:
    if quick:
        return {"shape": "micro", "seq": 32, "mbs": 4, "pretrain_iters": 4, "rlp_iters": 2,
                "rlp_mbs": 2, "thoughts": 2, "thought_len": 8, "min_prefix": 4,
                "max_context": 24, "lrs": [1e-4], "seeds": [1], "val_docs": 2, "test_docs": 3,
                "other_docs": 2, "ordinary": 4, "pretrain_lr": 3e-3}
    return {"shape": "small", "seq": 128, "mbs": 8, "pretrain_iters": 400, "rlp_iters": 30,
            "rlp_mbs": 4, "thoughts": 8, "thought_len": 48, "min_prefix": 8,
            "max_context": 96, "lrs": [1e-5, 1e-4, 1e-3], "seeds": [1, 2, 3], "val_docs": 20,
            "test_docs": 40, "other_docs": 20, "ordinary": 64, "pretrain_lr": 3e-3}


def classify(pieces: list[str]) -> list[str]:
    """Category of each target position (pieces[1:]): 'result' for the digit tokens of the
    number right after an '=' token, else 'ordinary'. Byte-level pieces: 'Ġ' marks a space."""
    cats = []
    in_result = False
    prev = pieces[0].replace("Ġ", "").strip()
    in_result = prev == "="
    for p in pieces[1:]:
        s = p.replace("Ġ", "").strip()
        if in_result and s and (s.isdigit() or (s == "-" and prev == "=")):
            cats.append("result")
        else:
            in_result = False
            cats.append("ordinary")
        if s == "=":
            in_result = True
        prev = s
    return cats


def build_data(embedded: str, out: str) -> dict:
    """Token files cut from the embedded training split (never the held-out documents):
    think      its thinking-style documents (for the base's pretraining blend)
    reasoning  its arithmetic and algebra documents with every thought removed (both arms)."""
    from megatron_rlp.data.corpus import strip_thoughts
    from megatron_rlp.data.embedded import embedded_paths
    from megatron_rlp.data.indexed import optimal_dtype, write_indexed_dataset
    from megatron_rlp.data.tokenizer import build_tokenizer

    paths = embedded_paths(embedded)
    docs = C.read_jsonl(paths.train_jsonl)
    tok = build_tokenizer("EmbeddedTokenizer")
    texts = {"think": [d["text"] for d in docs if d.get("thinking")],
             "reasoning": [strip_thoughts(d["text"]) for d in docs
                           if d["source"] in ("arithmetic", "algebra")]}
    prefixes = {"embedded": paths.train_prefix}
    for name, part in texts.items():
        if not part:
            raise ValueError(f"the embedded corpus in {embedded} has no {name} documents; "
                             "rebuild it (megatron_rlp.data.embedded, corpus version >= 2)")
        prefix = os.path.join(out, "data", f"{name}_text_document")
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        ids = [d + [tok.eod] for d in tok.encode_batch(part)]
        write_indexed_dataset(prefix, ids, dtype=optimal_dtype(tok.vocab_size))
        prefixes[name] = prefix
    return prefixes


def eval_texts(sc: dict, quick: bool) -> dict:
    """Held-out documents from another corpus seed, think-free: validation / test worked
    arithmetic (think-then-answer) and, for next-token loss, the test arithmetic plus algebra and
    other sources."""
    from megatron_rlp.data.corpus import generate_corpus

    docs = generate_corpus(400 if quick else 4000, EVAL_SEED)
    worked = [d["text"] for d in docs if d["source"] == "arithmetic" and d["quality"] == "high"]
    algebra = [d["text"] for d in docs if d["source"] == "algebra"]
    other = [d["text"] for d in docs if d["source"] not in ("arithmetic", "algebra")]
    val, test = worked[:sc["val_docs"]], worked[sc["val_docs"]:sc["val_docs"] + sc["test_docs"]]
    return {"val": val, "test": test,
            "loss": test + algebra[:sc["other_docs"]] + other[:sc["other_docs"]]}


def rlp_record(rows: list, save: str) -> dict:
    q = max(1, len(rows) // 4)
    quarters = [rows[i:i + q] for i in range(0, len(rows), q)][:4]
    avg = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    return {
        "ntp_equivalent_tokens": int(C.last(rows, "ntp_equivalent_tokens")),
        "reward_quarters": [avg(p, "reward_mean") for p in quarters],
        "positive_quarters": [avg(p, "info_gain_positive_frac") for p in quarters],
        "reward_mean_all": avg(rows, "reward_mean"),
        "info_gain_positive_frac": avg(rows, "info_gain_positive_frac"),
        "stopped_frac": avg(rows, "thought_stopped_frac"),
        "thought_len_mean": avg(rows, "thought_len_mean"),
        "equal_reward_groups": int(sum(r["equal_reward_groups"] for r in rows)),
        "groups": int(sum(r["groups"] for r in rows)),
        "reward_curve": C.series(rows, "reward_mean"),
        "positive_curve": C.series(rows, "info_gain_positive_frac"),
        "stopped_curve": C.series(rows, "thought_stopped_frac"),
        "wall_s": C.run_wall_s(save), "save": save,
    }


class Arms:
    """Launches (or reuses) the base, RLP and FLOP-matched CPT runs of the experiment."""

    def __init__(self, out: str, sc: dict, data: dict, reuse: bool, embedded: str):
        self.out, self.sc, self.data, self.reuse = out, sc, data, reuse
        self.model = C.flags({**C.SHAPES[sc["shape"]], "seq-length": sc["seq"],
                              "embedded-data-dir": embedded, "save-interval": 0})
        self.base = os.path.join(out, "runs", "base")

    def pretrain(self, seed: int) -> dict:
        sc = self.sc
        C.train(self.base, self.model + C.flags({
            "data-path": [0.6, self.data["embedded"], 0.4, self.data["think"]],
            "micro-batch-size": sc["mbs"], "train-iters": sc["pretrain_iters"],
            "lr": sc["pretrain_lr"], "min-lr": sc["pretrain_lr"] / 10,
            "lr-decay-style": "cosine", "lr-warmup-iters": max(1, sc["pretrain_iters"] // 10),
            "weight-decay": 0.1, "clip-grad": 1.0,
            "log-interval": max(1, sc["pretrain_iters"] // 20), "seed": seed}), reuse=self.reuse)
        return {"kind": "base", "save": self.base, "wall_s": C.run_wall_s(self.base)}

    def rlp(self, lr: float, seed: int) -> dict:
        sc = self.sc
        save = os.path.join(self.out, "runs", f"rlp_lr{lr:g}_s{seed}")
        rows = C.train(save, self.model + C.flags({
            "stage": "rlp", "load": self.base, "data-path": [self.data["reasoning"]],
            "micro-batch-size": sc["rlp_mbs"], "train-iters": sc["rlp_iters"], "lr": lr,
            "min-lr": lr, "lr-decay-style": "constant", "lr-warmup-iters": 0,
            "weight-decay": 0.1, "clip-grad": 1.0, "log-interval": 1,
            "rlp-num-thoughts": sc["thoughts"], "rlp-thought-length": sc["thought_len"],
            "rlp-temperature": 0.7, "rlp-min-prefix": sc["min_prefix"],
            "rlp-max-context": sc["max_context"], "rlp-prompt-template": "{context}",
            "seed": seed}), reuse=self.reuse)
        return {"kind": "rlp", "lr": lr, "seed": seed, **rlp_record(rows, save)}

    def cpt(self, lr: float, seed: int, tokens: int) -> dict:
        """Next-token training on the same documents for `tokens` (whole batches, rounded up)."""
        sc = self.sc
        iters = max(1, math.ceil(tokens / (sc["mbs"] * sc["seq"])))
        save = os.path.join(self.out, "runs", f"cpt_lr{lr:g}_{iters}it_s{seed}")
        rows = C.train(save, self.model + C.flags({
            "load": self.base, "finetune": True, "data-path": [self.data["reasoning"]],
            "micro-batch-size": sc["mbs"], "train-iters": iters, "lr": lr, "min-lr": lr,
            "lr-decay-style": "constant", "lr-warmup-iters": 0, "weight-decay": 0.1,
            "clip-grad": 1.0, "log-interval": max(1, iters // 10), "seed": seed}),
            reuse=self.reuse)
        return {"kind": "cpt", "lr": lr, "seed": seed, "iters": iters,
                "tokens": iters * sc["mbs"] * sc["seq"], "matched_to_tokens": tokens,
                "final_train_loss": C.last(rows, "loss"), "wall_s": C.run_wall_s(save),
                "save": save}


def test_eval(run: dict, texts: dict, sc: dict, seed: int) -> dict:
    e = think_eval.evaluate(run["save"], texts["test"], sc["thought_len"],
                            ordinary=sc["ordinary"], seed=seed)
    e["tokens"] = C.eval_tokens(run["save"], texts["loss"], sc["seq"], classify)
    return e


def paired(runs: dict, seeds: list, key) -> dict:
    """RLP - CPT per seed for a test metric `key(eval)`; mean, std, resolved (|mean| > 2 SE)."""
    diffs = [key(runs[f"rlp_s{s}"]["test"]) - key(runs[f"cpt_s{s}"]["test"]) for s in seeds]
    m, sd = C.mean_std(diffs)
    return {"per_seed": diffs, "mean": m, "std": sd,
            "resolved": len(diffs) > 1 and abs(m) > 2 * sd / math.sqrt(len(diffs))}


METRICS = {
    "think_acc": lambda e: e["think_acc"],
    "no_think_acc": lambda e: e["no_think_acc"],
    "result_loss": lambda e: e["tokens"]["result"]["loss"],
    "ordinary_loss": lambda e: e["tokens"]["ordinary"]["loss"],
    "gain_result": lambda e: e["gain_result"],
}


def main(argv=None) -> dict:
    p = C.base_parser("rlp_vs_cpt", __doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="learning-rate grid, the same for both arms")
    p.add_argument("--rlp-iters", type=int, default=None)
    p.add_argument("--pretrain-iters", type=int, default=None)
    p.add_argument("--report-only", action="store_true",
                   help="re-render report.md from the --out folder's metrics.json")
    args = p.parse_args(argv)
    out = C.out_dir(args, "rlp_vs_cpt")
    if args.report_only:
        with open(os.path.join(out, "metrics.json")) as f:
            metrics = json.load(f)
        C.write_results(out, metrics, report(metrics))
        return metrics
    sc = scale(args.quick)
    for k in ("seeds", "lrs", "rlp_iters", "pretrain_iters"):
        if getattr(args, k):
            sc[k] = getattr(args, k)
    embedded = C.ensure_embedded(args.embedded_data_dir)
    arms = Arms(out, sc, build_data(embedded, out), not args.fresh, embedded)
    texts = eval_texts(sc, args.quick)
    seeds = sc["seeds"]
    runs = {"base": arms.pretrain(seeds[0])}

    # LR grid at the first seed; each arm's best by validation think-then-answer accuracy.
    grid = []
    for lr in sc["lrs"]:
        r = arms.rlp(lr, seeds[0])
        c = arms.cpt(lr, seeds[0], r["ntp_equivalent_tokens"])
        for run in (r, c):
            run["val"] = think_eval.evaluate(run["save"], texts["val"], sc["thought_len"])
            grid.append(run)
    best = {arm: max((g for g in grid if g["kind"] == arm),
                     key=lambda g: (g["val"]["think_acc"], g["val"]["no_think_acc"]))["lr"]
            for arm in ("rlp", "cpt")}

    for seed in seeds:
        runs[f"rlp_s{seed}"] = r = arms.rlp(best["rlp"], seed)
        runs[f"cpt_s{seed}"] = arms.cpt(best["cpt"], seed, r["ntp_equivalent_tokens"])
    for name, run in runs.items():
        run["test"] = test_eval(run, texts, sc, seed=EVAL_SEED)
    base_val = think_eval.evaluate(runs["base"]["save"], texts["val"], sc["thought_len"])
    metrics = {"experiment": "rlp_vs_cpt", "quick": args.quick, "scale": sc, "best_lr": best,
               "grid": grid, "base_val": base_val, "runs": runs,
               "paired": {k: paired(runs, seeds, f) for k, f in METRICS.items()},
               "questions": {"val": base_val["questions"],
                             "test": runs["base"]["test"]["questions"]},
               "eval_tokens": {c: runs["base"]["test"]["tokens"].get(c, {}).get("tokens", 0)
                               for c in CLASSES}}
    for run in list(runs.values()) + grid:   # per-question flags only feed the summary
        for e in (run.get("test"), run.get("val")):
            if e:
                e.pop("correct_think", None)
    base_val.pop("correct_think", None)
    plots(out, metrics)
    C.write_results(out, metrics, report(metrics))
    return metrics


def plots(out: str, m: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rl = {n: r for n, r in m["runs"].items() if r["kind"] == "rlp"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=110)
    for ax, key, title in zip(axes, ("reward_curve", "positive_curve", "stopped_curve"),
                              ("reward (info gain, nats)", "share of thoughts with gain > 0",
                               "share of thoughts closed (</think>)")):
        for n, r in rl.items():
            ax.plot(*r[key], label=n)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RLP iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    C.save_figure(fig, os.path.join(out, "reward.png"))

    names = list(m["runs"])
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for i, (key, label) in enumerate((("think_acc", "think, then answer"),
                                      ("no_think_acc", "answer directly"))):
        ax.bar([j + 0.4 * (i - 0.5) for j in range(len(names))],
               [m["runs"][n]["test"][key] for n in names], 0.4, label=label)
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=7)
    ax.set_title("held-out result accuracy (exact match)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    C.save_figure(fig, os.path.join(out, "accuracy.png"))


def _pm(p: dict, scale: float = 1.0, unit: str = "") -> str:
    per = ", ".join(f"{scale * d:+.3f}" for d in p["per_seed"])
    return (f"{scale * p['mean']:+.3f} ± {scale * p['std']:.3f}{unit} (per seed {per}; "
            f"{'resolved' if p['resolved'] else 'not resolved'} at 2 SE)")


def report(m: dict) -> str:
    sc, runs, pr = m["scale"], m["runs"], m["paired"]
    seeds = sc["seeds"]
    grid = C.md_table(
        ["arm", "lr", "val think-then-answer acc", "val no-think acc", "val stop rate",
         "ntp tokens (RLP) / tokens (CPT)"],
        [[g["kind"], g["lr"], g["val"]["think_acc"], g["val"]["no_think_acc"],
          g["val"]["stopped_frac"],
          g.get("ntp_equivalent_tokens", g.get("tokens"))] for g in m["grid"]])
    rl = C.md_table(
        ["run", "lr", "ntp tokens", "reward by quarter", "gain > 0 share by quarter",
         "stop rate", "thought len", "equal-reward groups", "wall s"],
        [[n, r["lr"], r["ntp_equivalent_tokens"],
          " / ".join(f"{x:+.2f}" for x in r["reward_quarters"]),
          " / ".join(f"{x:.2f}" for x in r["positive_quarters"]), r["stopped_frac"],
          r["thought_len_mean"], f"{r['equal_reward_groups']}/{r['groups']}", r["wall_s"]]
         for n, r in runs.items() if r["kind"] == "rlp"])
    cp = C.md_table(["run", "lr", "iters", "tokens", "matched to RLP tokens", "wall s"],
                    [[n, r["lr"], r["iters"], r["tokens"], r["matched_to_tokens"], r["wall_s"]]
                     for n, r in runs.items() if r["kind"] == "cpt"])
    ev = C.md_table(
        ["run", "think-then-answer acc", "no-think acc", "thought stop rate", "thought len",
         "gain at results (nats)", "gain > 0 at results", "gain at ordinary", "result loss",
         "ordinary loss"],
        [[n, e["think_acc"], e["no_think_acc"], e["stopped_frac"], e["thought_len_mean"],
          e["gain_result"], e["gain_result_positive_frac"], e.get("gain_ordinary", float("nan")),
          e["tokens"]["result"]["loss"], e["tokens"]["ordinary"]["loss"]]
         for n, e in ((n, r["test"]) for n, r in runs.items())])
    acc = pr["think_acc"]
    verdict = ("RLP beats FLOP-matched CPT on think-then-answer accuracy beyond the seed spread"
               if acc["resolved"] and acc["mean"] > 0 else
               "CPT beats RLP on think-then-answer accuracy beyond the seed spread"
               if acc["resolved"] else
               "RLP and FLOP-matched CPT are not separated on think-then-answer accuracy")
    base = runs["base"]["test"]
    return f"""# RLP vs FLOP-matched continued pretraining (CPU scale)

{"**QUICK smoke-test scale: numbers are not meaningful.**" if m["quick"] else ""}

## Setup
- Model `{sc["shape"]}` (examples/experiments/common.py), seq {sc["seq"]}. One base, pretrained
  {sc["pretrain_iters"]} iterations × {sc["mbs"]} sequences (cosine {sc["pretrain_lr"]:g} → {sc["pretrain_lr"] / 10:g})
  on the embedded corpus (60%) blended with its thinking-style documents (40%): the base has seen
  `<think> … </think>` working before results and closes its thoughts.
- Both arms read the same documents: the embedded training split's arithmetic and algebra
  documents with the thoughts removed. Seeds {seeds} (data order, thought sampling).
- RLP: {sc["rlp_iters"]} iterations × {sc["rlp_mbs"]} contexts, G = {sc["thoughts"]} thoughts of ≤ {sc["thought_len"]} tokens,
  T = 0.7, info-gain reward vs the EMA teacher (τ = 0.999), contexts of {sc["min_prefix"]}–{sc["max_context"]} tokens of one
  document, prompt `{{context}}` then `<think>`.
- CPT: next-token training on the same documents for the RLP run's `ntp_equivalent_tokens`
  (rounded up to whole batches of {sc["mbs"]} × {sc["seq"]}).
- LR grid {sc["lrs"]} for both arms at seed {seeds[0]}, constant LR; best by validation think-then-answer
  accuracy: **RLP {m["best_lr"]["rlp"]:g}, CPT {m["best_lr"]["cpt"]:g}**.
- Evaluation: held-out documents of corpus seed {EVAL_SEED} (think-free). Think-then-answer: greedy
  thought (≤ {sc["thought_len"]} tokens), `</think>`, greedy answer, exact match on {m["questions"]["test"]} worked-step results
  (validation: {m["questions"]["val"]}). Next-token loss without thinking on {m["eval_tokens"]["result"]} result and
  {m["eval_tokens"]["ordinary"]} ordinary tokens. Gain = log p(x_t | thought) − log p(x_t) of the same model.

## Learning-rate grid (seed {seeds[0]}, validation split)
{grid}

## RLP runs
{rl}

![reward, positive-gain share, stop rate](reward.png)

## FLOP-matched CPT runs
{cp}

## Test evaluation
{ev}

![accuracy](accuracy.png)

## Paired differences, RLP − CPT (same seed)
- think-then-answer accuracy: {_pm(acc, 100, " pp")}
- no-think accuracy: {_pm(pr["no_think_acc"], 100, " pp")}
- result-token loss without thinking: {_pm(pr["result_loss"])} nats
- ordinary-token loss without thinking: {_pm(pr["ordinary_loss"])} nats
- information gain of a thought at results: {_pm(pr["gain_result"])} nats

**{verdict}.** The base thinks-then-answers {100 * base["think_acc"]:.1f}% right and answers directly
{100 * base["no_think_acc"]:.1f}% right (its thoughts close {100 * base["stopped_frac"]:.0f}% of the time at results).

## Why, and what would change the outcome
{diagnosis(m)}
"""


def diagnosis(m: dict) -> str:
    """The mechanism behind the outcome, read off the numbers (the paper's premises in turn)."""
    runs, sc = m["runs"], m["scale"]
    base = runs["base"]["test"]
    rl = [r for r in runs.values() if r["kind"] == "rlp"]
    rlp_test = [runs[f"rlp_s{s}"]["test"] for s in sc["seeds"]]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    share = m["eval_tokens"]["result"] / max(sum(m["eval_tokens"].values()), 1)
    out = []
    if base["think_acc"] < 0.2:
        out.append(
            f"- The base cannot yet do the arithmetic its thoughts write out: think-then-answer "
            f"{100 * base['think_acc']:.1f}%, no-think {100 * base['no_think_acc']:.1f}%, although "
            f"{100 * base['stopped_frac']:.0f}% of its thoughts close. A thought that ends `so N` "
            f"with a wrong N makes the model copy N, so at result positions a thought costs "
            f"{-base['gain_result']:.2f} nats on average (positive for "
            f"{100 * base['gain_result_positive_frac']:.0f}%). RLP can only reinforce thoughts "
            "that sometimes help; here too few do. The paper starts from a 1.7B/12B base whose "
            "thoughts are often right.")
    out.append(
        f"- Positions: RLP draws t uniformly inside documents; result digits are "
        f"{100 * share:.0f}% of the evaluated tokens. At ordinary positions a thought costs "
        f"{-base.get('gain_ordinary', float('nan')):.2f} nats for the base (its thinking-style data "
        f"only ever thinks before a number), so the training reward (mean "
        f"{mean([r['reward_mean_all'] for r in rl]):+.2f} nats, positive for "
        f"{100 * mean([r['info_gain_positive_frac'] for r in rl]):.0f}% of thoughts) is set by "
        "positions where no thought can help.")
    stops = ", ".join(f"{100 * e['stopped_frac']:.0f}%" for e in rlp_test)
    lengths = ", ".join(f"{e['thought_len_mean']:.0f}" for e in rlp_test)
    ordinary = lambda e: e["tokens"]["ordinary"]["loss"]  # noqa: E731
    rlp_cost = mean([ordinary(e) for e in rlp_test]) - ordinary(base)
    cpt_gain = ordinary(base) - mean([ordinary(runs[f"cpt_s{s}"]["test"]) for s in sc["seeds"]])
    out.append(
        f"- Stop rate: the base closes {100 * base['stopped_frac']:.0f}% of thoughts at results; after "
        f"RLP at LR {m['best_lr']['rlp']:g} the test stop rate is {stops} (per seed) and the thought "
        f"length {lengths} of {sc['thought_len']}: ranking mostly-harmful thoughts by their reward "
        "moved the policy away from the format. RLP has no next-token term: its next-token loss "
        f"without thinking rose by {rlp_cost:+.2f} nats on ordinary tokens, while FLOP-matched CPT "
        f"lowered it by {cpt_gain:.2f}.")
    out.append(
        "- What would change it: (1) a base whose thoughts are right more often than its direct "
        "answers (longer pretraining on the thinking-style documents; check think-then-answer "
        "accuracy of the base first); (2) contexts where thinking can help (results, or an "
        "entropy filter as in RPT) instead of uniform positions, or thinking-style data that also "
        "thinks before ordinary tokens; (3) a lower LR over more steps (at 1e-4 the validation "
        "stop rate stayed high) so the format survives while the reward is optimised.")
    out.append(
        "- Regime: model ~0.6M parameters, base that cannot yet compute in its thoughts, "
        f"{sc['rlp_iters']} RLP steps of {sc['rlp_mbs']} contexts, G = {sc['thoughts']}, thoughts ≤ "
        f"{sc['thought_len']} tokens. This is outside the regime the paper claims for, so the "
        "outcome neither reproduces nor contradicts it.")
    return "\n".join(out)


if __name__ == "__main__":
    main()
