"""Convert between megatron-rlp checkpoints and Hugging Face NemotronH directories.

    python tools/convert_checkpoint.py --to-hf   --load runs/tiny   --save hf/tiny
    python tools/convert_checkpoint.py --from-hf --load hf/tiny     --save runs/from_hf

--to-hf reads a checkpoint saved at any TP/PP (dist_checkpointing gathers the shards, one layer
at a time) and writes config.json, model.safetensors (sharded with an index above
--max-shard-size), generation_config.json and tokenizer files that
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads as NemotronHForCausalLM.
--from-hf writes a weights-only checkpoint at TP=PP=1; training reshards it to any TP/PP on --load.
See docs/HF.md. Bad input (unknown tensor, shape mismatch, a config the other format cannot
express) ends with one line naming it and exit code 2, before anything is written.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to-hf", action="store_true", help="megatron-rlp checkpoint -> HF dir")
    direction.add_argument("--from-hf", action="store_true", help="HF dir -> megatron-rlp checkpoint")
    parser.add_argument("--load", required=True, help="source: checkpoint root (with `latest`) or HF dir")
    parser.add_argument("--save", required=True, help="destination directory")
    parser.add_argument("--iteration", "--ckpt-step", dest="iteration", type=int, default=None,
                        help="--to-hf: export this iteration instead of `latest` (--ckpt-step is "
                        "train's name, which load errors suggest)")
    parser.add_argument("--max-shard-size", default="2GB",
                        help="--to-hf: split model.safetensors above this size (e.g. 2GB, 500MB)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="--to-hf: tensor dtype in the HF files (auto: as saved)")
    parser.add_argument("--trim-vocab", action="store_true",
                        help="--to-hf: cut megatron's padded vocab rows down to the tokenizer's size")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a model already in --save (--to-hf: the whole directory, "
                        "swapped in once the new export is complete)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from megatron_rlp.cli import run_main

    return run_main("convert_checkpoint", lambda: _convert(args))


def _convert(args) -> None:
    if args.to_hf:
        from megatron_rlp.hf.export import export_to_hf

        export_to_hf(args.load, args.save, max_shard_size=args.max_shard_size,
                     dtype=args.dtype, trim_vocab=args.trim_vocab, overwrite=args.overwrite,
                     iteration=args.iteration)
    else:
        from megatron_rlp.hf.import_ import import_from_hf

        import_from_hf(args.load, args.save, overwrite=args.overwrite)


if __name__ == "__main__":
    sys.exit(main())
