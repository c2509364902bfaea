"""llama.cpp running our f32 GGUF reproduces the float64 reference computed from the HF safetensors."""

import numpy as np
from tokenizers import Tokenizer

from tests.helpers.llama import llama_cpp_logits
from convert.hf_config import HFConfig
from tests.helpers.reference_model import cosine_rows, reference_logits

PROMPT = (
    "import os\nimport sys\n\n\ndef main(argv):\n    \"\"\"Print every argument on its own line.\"\"\"\n"
    "    for i, arg in enumerate(argv):\n        print(i, arg, file=sys.stdout)\n    return 0\n\n\n"
    "if __name__ == '__main__':\n    sys.exit(main(sys.argv))\n"
)


def test_llama_cpp_f32_matches_float64_reference(tiny_ckpt, tiny_gguf):
    cfg = HFConfig.load(tiny_ckpt)
    ids = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json")).encode(PROMPT).ids
    assert len(ids) > 4 * cfg.sliding_window, "the prompt must cross the sliding window several times"
    ref = reference_logits(tiny_ckpt, ids)
    got = llama_cpp_logits(tiny_gguf("f32"), ids)
    cos = cosine_rows(ref, got)
    print(f"\nfidelity over {len(ids)} positions: min cosine {cos.min():.7f}, "
          f"max |diff| {np.abs(ref - got).max():.2e}, top-1 agreement {(ref.argmax(-1) == got.argmax(-1)).mean():.3f}")
    assert cos.min() >= 0.9999
    assert (ref.argmax(-1) == got.argmax(-1)).mean() == 1.0
