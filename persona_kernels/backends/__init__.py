"""One module per backend of ``masked_ffn``; :mod:`persona_kernels.ops` dispatches among them."""
