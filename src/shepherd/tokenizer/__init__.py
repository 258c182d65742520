"""Tokenization for gRPC workers: loading tokenizers, chat templates, incremental decoding, the registry.

Everything here imports `tokenizers` and `jinja2`, so the package is imported only when a gRPC worker or the
tokenizer API is used: an HTTP-only gateway never pays for it.
"""
