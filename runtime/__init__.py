"""stepstream runtime: the Step-3.5 model, generation, the CLI, the server and benchmarks."""


def load(path, **options):
    """Open a Step-3.5 GGUF for inference: `runtime.load("model.gguf", n_ctx=4096, n_threads=2)`.

    Options are the fields of `runtime.options.RuntimeOptions`. Imported lazily so that
    `runtime.errors` and the CLI stay cheap to import.
    """
    from runtime.model import load as _load

    return _load(path, **options)
