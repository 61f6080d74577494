"""Weight-only int8/int4 quantisation for inference (docs/quantization.md).

``format`` (the stored layout: quantise, pack, and the dequantise that is the spec every kernel is tested against)
and ``modules`` (``QuantizedLinear``, ``QuantizedExperts``, and ``quantize_modules``, which swaps them in);
``measure`` times the kernels for the cost model's profile of this CPU. The kernels live with the other backends
in smoe.kernels; ``smoe.quantize(model, "int8")`` is the entry point.
"""
