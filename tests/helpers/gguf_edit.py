"""Copying a GGUF with some of it changed: files the converter would never write."""

from __future__ import annotations

import gguf
import numpy as np


def rewrite(src, dst, *, drop=(), change=None, add=None, arch=None, split_max_tensors=0, keep_tensor=lambda name: True):
    """Copy a GGUF, optionally dropping, changing or adding metadata (add: key -> (value,
    GGUFValueType)), dropping tensors, or splitting it in parts."""
    r = gguf.GGUFReader(src)
    arch = arch or r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch, split_max_tensors=split_max_tensors)
    change = change or {}
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = change.get(key, field.contents())
        w.add_key_value(key, value, vtype, sub)
    for key, (value, vtype) in (add or {}).items():
        w.add_key_value(key, value, vtype)
    for t in r.tensors:
        if not keep_tensor(t.name):
            continue
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=np.asarray(t.data).shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
