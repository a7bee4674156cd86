"""Model families, one module each, written only against the IR builder.

Installed as the package `reft_models`. Every module here that defines ARCHITECTURES,
Config and build is registered under its Hugging Face `architectures` names by
reft/frontends/architectures.py (no list to edit: drop a file in and it is found).
"""
