"""Test helpers: references (float64 forward pass, llama.cpp, ggml's quantizers) and file tools.

reference_weights, reference_model  the float64 numpy reference of the forward pass
llama                               llama.cpp's logits through llama-cpp-python
gguf_edit                           copying a GGUF with metadata or tensors changed
quant_data, quant_ggml              weight sets for the quantizer tests, ggml's C quantizers
faulty_experts                      an expert provider that raises on a chosen request
"""
