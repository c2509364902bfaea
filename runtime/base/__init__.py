"""The ground layer: what every other layer stands on, importing nothing of the project.

errors       the one exception type users see
system       memory and thread facts of this machine, OpenMP's wait policy
cgroup       cgroup-v1 memory caps (benchmarks and tests), evicting a file from the page cache
units        byte sizes written by people ("6GiB")
gguf_schema  every GGUF metadata key and tensor name: the converter writes them, the loader
             and offload read them
gguf_file    opening a GGUF (single or split), tensors as views of the mapped file
config       the model's hyperparameters from GGUF metadata, validated and frozen
options      what a caller may choose about running a model, validated and frozen
"""
