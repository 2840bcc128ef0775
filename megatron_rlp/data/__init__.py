"""Data: embedded corpus and tokenizer, Megatron .bin/.idx writing, datasets via megatron-core.

Import the submodules directly; this package imports nothing heavy (megatron-core costs ~4 s to
import, and tokenizer/corpus are used in light processes such as preprocessing workers).

    tokenizer.build_tokenizer(type, model)           -> RLPTokenizer
    corpus.generate_corpus(num_docs, seed)           -> list of {"text", "source", "quality"}
    indexed.write_indexed_dataset(prefix, docs)      -> <prefix>.bin/.idx (atomic)
    embedded.ensure_embedded_dataset(out_dir)        -> train prefix of the embedded default
    datasets.build_pretraining_dataset(data_path, …) -> megatron-core GPTDataset / BlendedDataset
"""
