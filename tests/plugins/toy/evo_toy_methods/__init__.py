"""A compression method from a plugin: ``toy_int4``, symmetric int4 in groups, with its
kernel on the transformers back end (``evo_toy_methods.kernel``).

This module is loaded when evo-compress first reads its method registry, so it imports
only ``evo_compress.methods``; the kernel's module (torch) is imported when it is used."""

from __future__ import annotations

from evo_compress.methods import CompressionMethod, SyntheticTraits, TransformersSupport

TOY_INT4 = CompressionMethod(
    name="toy_int4",
    kind="quantization",
    description="Symmetric int4 in groups, one fp32 scale per group (a plugin's method).",
    weight_bits=4,
    group_sizes=(32, 64, 128),
    scale_bits=32,
    transformers=TransformersSupport(
        library="evo-toy-plugin",
        kernel="evo_toy_methods.kernel:quantize",
        probe="evo_toy_methods.kernel:probe",
    ),
    synthetic=SyntheticTraits(
        degradation=0.07, dequant_factor=1.5, compute_factor=0.8, calibration_j=1e4
    ),
)
