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


def from_pretrained(repo_id: str, filename: str | None = None, additional_files=None, local_dir=None,
                    local_dir_use_symlinks="auto", cache_dir=None, **options):
    """llama-cpp-python's `Llama.from_pretrained`: the GGUF `filename` (a path in the Hugging
    Face repository `repo_id` or a glob, in any case; None: Q4_K_M, else Q8_0, else the first
    model) fetched into the Hugging Face cache (`cache_dir`, default HF_HUB_CACHE) as `-hf` does
    (runtime.hub), then loaded with `options` as `load` takes them. A split model's parts come
    together: `additional_files` may name them (globs), and a pattern that names none of them
    (an mmproj, which nothing here reads) is a ValueError, as one that matches nothing is in
    llama-cpp-python; `local_dir` is refused: the files stay in the cache, where the next call
    finds them, offline too."""
    import fnmatch

    from runtime.base.errors import UnknownOption
    from runtime.base.gguf_file import split_parts
    from runtime.hub import HubError, fetch

    if local_dir is not None:
        raise UnknownOption("from_pretrained(local_dir=...) is not supported: the files go to the Hugging Face cache "
                            "(cache_dir= chooses it), where a later call finds them")
    del local_dir_use_symlinks  # (it concerns local_dir alone)
    path = fetch(repo_id, filename, say=lambda text: None, token=options.pop("token", None), cache_dir=cache_dir)
    names = [p.name.lower() for p in split_parts(path)]
    for pattern in additional_files or ():
        if not any(fnmatch.fnmatchcase(n, str(pattern).lower().rsplit("/", 1)[-1]) for n in names):
            raise HubError(f"additional_files {pattern!r} names no part of {path.name}: a split model's parts are "
                           "fetched with it, and other files (an mmproj) are not read here")
    return load(path, **options)


def __getattr__(name):
    """`runtime.LlamaGrammar`: llama-cpp-python's grammar class, for `grammar=` (imported on first use)."""
    if name == "LlamaGrammar":
        from runtime.text.gbnf_grammar import LlamaGrammar

        return LlamaGrammar
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
