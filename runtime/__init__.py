"""stepstream runtime: the Step-3.5 model, generation, the CLI and benchmarks.

`runtime.load` is the composition root (runtime.loader); it is imported on first use so
that the ground layer (runtime.base) and the CLI stay cheap to import.
"""

__version__ = "0.1.0"


def load(path=None, **options):
    """Open a Step-3.5 GGUF for inference: `runtime.load("model.gguf", n_ctx=4096, n_threads=2)`
    (or `model_path=`, llama-cpp-python's name for the path).

    Options are the fields of `runtime.base.options.RuntimeOptions`.
    """
    from runtime.loader import load as _load

    return _load(path, **options)


def __getattr__(name):
    """`runtime.LlamaGrammar`: llama-cpp-python's grammar class, for `grammar=` (imported on first use)."""
    if name == "LlamaGrammar":
        from runtime.text.gbnf_grammar import LlamaGrammar

        return LlamaGrammar
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
