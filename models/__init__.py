"""Model families, one module each, written only against the IR builder.

Importing this package registers every shipped family under its Hugging Face
`architectures` names (see reft/models registry: `reft.registry`).
"""
