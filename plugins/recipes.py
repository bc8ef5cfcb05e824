"""The built-in recipes: the candidates ``slimfleet compress`` measures by default.

Every recipe starts with ``normalize`` and ``simplify`` (both lossless): quantizers then
see Constant-node weights, and BatchNorm is folded before float16 can clamp its
statistics. A recipe whose passes are not all registered is left out.

The order is the priority: when the time budget runs short, the search drops recipes
from the end. Dynamic int8 on Conv comes last: it is the one most often slower than
the original on CPU (measured on u2net: 6x slower).
"""

from __future__ import annotations

from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.passes import Pass
from slimfleet.host.recipes import Recipe, Step
from slimfleet.host.registry import Registry

PREPARE = (Step("normalize"), Step("simplify"))
PREPARE_OPSET13 = (Step("normalize", {"opset": 13}), Step("simplify"))
"""Per-channel QDQ needs per-axis DequantizeLinear, which arrived in opset 13."""
DYNAMIC_OPS = ["MatMul", "Gemm", "LSTM", "Attention", "Gather"]
"""What dynamic quantization speeds up on CPU (GRU has no dynamic int8 kernel in ORT), and
Gather: an embedding table stored in int8 is 4x smaller (MiniLM-L3: 53.2 -> 17.5 MB, mean
output cosine 0.997 -> 0.995 on 32 sentences; Gathers of shapes have no float weight)."""
GPTQ_OPS = ["MatMul", "Gemm", "LSTM"]
"""The weights ``gptq`` rounds and ``smoothquant`` scales: those of DYNAMIC_OPS but
Attention and Gather."""
CONV_FAMILY = ["Conv", "ConvTranspose", "Add", "Mul", "Sigmoid", "Relu", "Clip", "LeakyRelu"]
CONV_FAMILY += ["MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "Resize", "Pad"]
"""Ops around convolutions that QDQ keeps in int8 between QLinearConv kernels."""

PERCENTILE = {"calibration": "percentile", "percentile": 99.99}
"""Measured on ddddocr's OCR and detector: clipping the top 0.01% of activations beat
min-max and onnxruntime's default 99.999 (detector output cosine 0.983-0.988 -> 0.994)."""

BUILTIN_RECIPES = (
    Recipe(
        "lossless",
        (*PREPARE, Step("ortopt", {"level": "basic"})),
        "normalize, simplify and onnxruntime's portable graph optimizations",
        lossy=False,
    ),
    Recipe(
        "int8_dynamic_matmul",
        (*PREPARE, Step("quantize_dynamic", {"op_types": DYNAMIC_OPS, "per_channel": True})),
        "dynamic int8 on MatMul, Gemm, LSTM, Attention and Gather (embeddings) only, per channel",
    ),
    Recipe(
        "int8_dynamic_smooth_gptq",
        (
            *PREPARE,
            Step("smoothquant", {"op_types": GPTQ_OPS}),
            Step("gptq", {"op_types": GPTQ_OPS}),
            Step("quantize_dynamic", {"op_types": DYNAMIC_OPS, "per_channel": True}),
        ),
        "dynamic int8 on MatMul, Gemm, LSTM, Attention and Gather, per channel, after "
        "moving the MatMul/Gemm/LSTM inputs' channel ranges into their weights "
        "(SmoothQuant) and rounding those by GPTQ, both from the calibration data "
        "(ddddocr's OCR: 95.7% -> 98.5% of 536 texts kept)",
    ),
    Recipe(
        "int8_dynamic_gptq",
        (
            *PREPARE,
            Step("gptq", {"op_types": GPTQ_OPS}),
            Step("quantize_dynamic", {"op_types": DYNAMIC_OPS, "per_channel": True}),
        ),
        "dynamic int8 on MatMul, Gemm, LSTM, Attention and Gather, per channel, with the "
        "MatMul/Gemm/LSTM weights rounded by GPTQ on the calibration data (ddddocr's OCR: "
        "94% -> 96% of texts kept)",
    ),
    Recipe(
        "int8_static",
        (*PREPARE_OPSET13, Step("quantize_static", PERCENTILE)),
        "static int8 QDQ, per-channel weights, 99.99th-percentile calibration",
    ),
    Recipe(
        "int8_combined",
        (
            *PREPARE_OPSET13,
            Step("quantize_static", {"op_types": CONV_FAMILY, **PERCENTILE}),
            Step("quantize_dynamic", {"op_types": DYNAMIC_OPS, "per_channel": True}),
        ),
        "static int8 QDQ on the convolutional part, dynamic int8 on MatMul/Gemm/LSTM",
    ),
    Recipe(
        "int8_combined_heavy",
        (
            *PREPARE_OPSET13,
            Step(
                "quantize_static",
                {"op_types": ["Conv", "ConvTranspose"], "mac_share": 0.85, **PERCENTILE},
            ),
            Step("quantize_dynamic", {"op_types": DYNAMIC_OPS, "per_channel": True}),
        ),
        "static int8 QDQ on the convolutions doing 85% of the arithmetic, dynamic int8 on "
        "MatMul/Gemm/LSTM; light convolutions and activations stay float (more accurate)",
    ),
    Recipe(
        "fp16",
        (*PREPARE, Step("fp16")),
        "float16 weights and activations, float32 inputs and outputs",
    ),
    Recipe(
        "int8_dynamic",
        (*PREPARE, Step("quantize_dynamic")),
        "onnxruntime's dynamic int8 defaults (Conv too, which is often slower on CPU)",
    ),
)


@hookimpl
def slimfleet_add_recipes(recipes: Registry[Recipe], passes: Registry[Pass]) -> None:
    """Register the built-in recipes whose passes are all registered."""
    for recipe in BUILTIN_RECIPES:
        if all(step.pass_name in passes for step in recipe.steps):
            recipes.add(recipe)
