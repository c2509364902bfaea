"""The ground layer: what every other layer stands on, importing nothing of the project.

errors       the one exception type users see
system       memory and thread facts of this machine, OpenMP's wait policy
cgroup       cgroup-v1 memory caps (benchmarks and tests), evicting a file from the page cache
units        byte sizes written by people ("6GiB")
memory_limit the memory this process may still take: host, cgroup v1/v2 (every level up), RLIMIT_AS
gguf_header  the GGUF header read with every count, length and offset checked against the file
gguf_schema  every GGUF metadata key and tensor name: the converter writes them, the loader
             and offload read them
gguf_file    opening a GGUF (single or split), tensors as views of the mapped file
config       the model's hyperparameters from GGUF metadata, validated and frozen
tensor_shapes every tensor's shape as the config implies it, checked when the config is built
options      what a caller may choose about running a model, validated and frozen
"""
