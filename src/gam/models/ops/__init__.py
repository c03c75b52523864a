"""The operations the model families are built from, one definition each, with a reference
beside every fast path (flash-linear-attention's ``ops/`` split): causal convolutions
(``conv``), the selective scan (``selective_scan``), memory-bank retrieval
(``memory_retrieval``), the delta rule (``delta_rule``), RWKV-7's generalised delta rule
(``generalized_delta``), the S4D kernel (``s4d_kernel``), attention heads and the KV cache
(``attention``), rotary positions (``rotary``), fused dropout and gated residuals (``fused``)
and the chunked cross-entropy (``losses``). A family module imports only the shell
(``gam.models.lm``) and these ops, never another family (``tests/test_layers.py`` checks it).
"""
