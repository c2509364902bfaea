"""The Step-3.5 model: weights bound to the config, blocks, KV cache, decode plan, experts.

Compute only: it never opens a file (weights are views handed over by the loader, routed
experts come through an ExpertProvider). Imports runtime.base, quant, runtime.text and
runtime.generation, nothing above.
"""
