"""Hugging Face NemotronH conversion: `export_to_hf`, `import_from_hf`, layer-by-layer parity.

See docs/HF.md. `mapping` holds the pure name/layout/config functions.
"""
