"""Small ONNX models built with onnx.helper, shaped like the real ones slimfleet meets."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 0
"""Every factory draws its weights from a fresh generator: the same model in any test order."""


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def _model(graph: onnx.GraphProto, opset: int) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def conv_bn_net(
    opset: int = 13, channels: int = 16, classes: int = 10, seed: int = SEED
) -> onnx.ModelProto:
    """Conv -> BatchNorm -> Relu twice, global pool, Gemm classifier; input 1x3x32x32."""
    rng = np.random.default_rng(seed)
    c = channels
    inits = [
        _init("w1", rng.normal(0, 0.3, (c, 3, 3, 3))),
        _init("b1", rng.normal(0, 0.1, (c,))),
        _init("w2", rng.normal(0, 0.1, (c, c, 3, 3))),
        _init("b2", rng.normal(0, 0.1, (c,))),
        _init("wf", rng.normal(0, 0.3, (classes, c))),
        _init("bf", rng.normal(0, 0.1, (classes,))),
    ]
    for i in (1, 2):
        inits += [
            _init(f"bn{i}_s", rng.uniform(0.5, 1.5, (c,))),
            _init(f"bn{i}_b", rng.normal(0, 0.1, (c,))),
            _init(f"bn{i}_m", rng.normal(0, 0.1, (c,))),
            _init(f"bn{i}_v", rng.uniform(0.5, 1.5, (c,))),
        ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c1", "bn1_s", "bn1_b", "bn1_m", "bn1_v"], ["n1"], name="bn1"
        ),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c2", "bn2_s", "bn2_b", "bn2_m", "bn2_v"], ["n2"], name="bn2"
        ),
        helper.make_node("Relu", ["n2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bn_net",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])],
        inits,
    )
    return _model(graph, opset)


def mlp(
    opset: int = 13, features: int = 64, hidden: int = 128, classes: int = 10, seed: int = SEED
) -> onnx.ModelProto:
    """MatMul/Add/Relu x2 with a dynamic batch axis: input [batch, features]."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("w1", rng.normal(0, 0.2, (features, hidden))),
        _init("b1", rng.normal(0, 0.1, (hidden,))),
        _init("w2", rng.normal(0, 0.2, (hidden, classes))),
        _init("b2", rng.normal(0, 0.1, (classes,))),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["o"], name="mm2"),
        helper.make_node("Add", ["o", "b2"], ["y"], name="add2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    return _model(graph, opset)


def gemm(trans_b: int, beta: float = 1.0, seed: int = 5) -> onnx.ModelProto:
    """One Gemm ``fc`` with bias: x [8, 64] -> y [8, 16]; weight ``w`` [16, 64] with
    ``transB=1``, else [64, 16]."""
    rng = np.random.default_rng(seed)
    shape = (16, 64) if trans_b else (64, 16)
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], "fc", transB=trans_b, beta=beta)
    graph = helper.make_graph(
        [node],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 16])],
        [_init("w", rng.normal(0, 0.3, shape)), _init("b", rng.normal(0, 0.1, 16))],
    )
    return _model(graph, 13)


def lstm(
    opset: int = 13,
    steps: int = 8,
    features: int = 16,
    hidden: int = 32,
    seed: int = SEED,
    directions: int = 1,
) -> onnx.ModelProto:
    """An LSTM followed by a MatMul head: input [steps, 1, features]. Forward, output
    [steps, 1, 5]; with ``directions=2`` bidirectional, output [steps, 2, 1, 5]."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("W", rng.normal(0, 0.2, (directions, 4 * hidden, features))),
        _init("R", rng.normal(0, 0.2, (directions, 4 * hidden, hidden))),
        _init("B", rng.normal(0, 0.1, (directions, 8 * hidden))),
        _init("head", rng.normal(0, 0.2, (hidden, 5))),
    ]
    cell = helper.make_node("LSTM", ["seq", "W", "R", "B"], ["Y"], name="lstm", hidden_size=hidden)
    if directions == 2:
        cell.attribute.append(helper.make_attribute("direction", "bidirectional"))
        nodes = [cell, helper.make_node("MatMul", ["Y", "head"], ["out"], name="head_mm")]
        out_shape = [steps, 2, 1, 5]
    else:
        inits.append(onnx.helper.make_tensor("axes", TensorProto.INT64, [1], [1]))
        nodes = [
            cell,
            helper.make_node("Squeeze", ["Y", "axes"], ["Ys"], name="squeeze"),
            helper.make_node("MatMul", ["Ys", "head"], ["out"], name="head_mm"),
        ]
        out_shape = [steps, 1, 5]
    graph = helper.make_graph(
        nodes,
        "lstm",
        [helper.make_tensor_value_info("seq", TensorProto.FLOAT, [steps, 1, features])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)],
        inits,
    )
    return _model(graph, opset)


def constant_weights(opset: int = 13) -> onnx.ModelProto:
    """Like :func:`mlp` but the weights are Constant nodes, as some converters export them."""
    base = mlp(opset)
    nodes = [
        helper.make_node("Constant", [], [init.name], name=f"const_{init.name}", value=init)
        for init in base.graph.initializer
    ]
    graph = helper.make_graph(
        nodes + list(base.graph.node),
        "constant_weights",
        list(base.graph.input),
        list(base.graph.output),
    )
    return _model(graph, opset)


def add_one(opset: int = 13, size: int = 4) -> onnx.ModelProto:
    """y = x + c; tiny and exact, for delivery tests. ``c`` can be varied per version."""
    return add_const(1.0, opset, size)


def add_const(
    value: float, opset: int = 13, size: int = 4, pad_bytes: int = 0, seed: int = SEED
) -> onnx.ModelProto:
    """y = x + value. ``pad_bytes`` adds an unused initializer to make the file bigger."""
    rng = np.random.default_rng(seed)
    inits = [_init("c", np.full((size,), value))]
    if pad_bytes:
        inits.append(_init("pad", rng.normal(size=(pad_bytes // 4,))))
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"], name="add")],
        "add_const",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, size])],
        inits,
    )
    return _model(graph, opset)


ATTENTION_WIDTH = 16
ATTENTION_STEPS = 12


def masked_attention(mask_value: float = float("-inf"), seed: int = SEED) -> onnx.ModelProto:
    """One self-attention block as PyTorch exports a padded encoder: x [1, T, 16] and a
    bool ``mask`` [1, T] (True: a real step); padded keys get ``mask_value`` added to
    their scores (``masked_fill``: -inf, -1e9 or float32's lowest), then Softmax,
    LayerNormalization and a MatMul head to 4 scores per step."""
    rng = np.random.default_rng(seed)
    d = ATTENTION_WIDTH
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], "query"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], "key"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], "value"),
        helper.make_node("Transpose", ["k"], ["kt"], "keys_t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["raw"], "scores"),
        helper.make_node("Mul", ["raw", "scale"], ["scaled"], "scale_scores"),
        helper.make_node("Not", ["mask"], ["padded"], "padding"),
        helper.make_node("Where", ["padded", "fill", "zero"], ["bias"], "masked_fill"),
        helper.make_node("Unsqueeze", ["bias", "one"], ["bias3"], "bias_rows"),
        helper.make_node("Add", ["scaled", "bias3"], ["masked"], "mask_scores"),
        helper.make_node("Softmax", ["masked"], ["weights"], "softmax", axis=-1),
        helper.make_node("MatMul", ["weights", "v"], ["mixed"], "mix"),
        helper.make_node("Add", ["mixed", "x"], ["residual"], "residual"),
        helper.make_node(
            "LayerNormalization", ["residual", "gamma", "beta"], ["normed"], "norm", axis=-1
        ),
        helper.make_node("MatMul", ["normed", "head"], ["scores_out"], "head"),
    ]
    inits = [
        *(_init(n, rng.normal(0, 0.4, (d, d))) for n in ("wq", "wk", "wv")),
        _init("head", rng.normal(0, 0.4, (d, 4))),
        _init("scale", np.array(d**-0.5)),
        _init("fill", np.array(mask_value)),
        _init("zero", np.array(0.0)),
        _init("gamma", rng.uniform(0.5, 1.5, d)),
        _init("beta", rng.normal(0, 0.1, d)),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
    ]
    graph = helper.make_graph(
        nodes,
        "masked_attention",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "t", d]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, [1, "t"]),
        ],
        [helper.make_tensor_value_info("scores_out", TensorProto.FLOAT, [1, "t", 4])],
        inits,
    )
    return _model(graph, 17)


def attention_feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Feeds for :func:`masked_attention`: every sample padded after 4 to 11 real steps."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        real = int(rng.integers(4, ATTENTION_STEPS))
        x = rng.normal(0, 1, (1, ATTENTION_STEPS, ATTENTION_WIDTH)).astype(np.float32)
        feeds.append({"x": x, "mask": (np.arange(ATTENTION_STEPS) < real)[None]})
    return feeds


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


DETECTOR_CLASSES = 3
DETECTOR_ANCHORS = 64
DETECTOR_PIXELS = 320.0


def detector_head(tail: str = "none", seed: int = SEED) -> onnx.ModelProto:
    """A YOLOv8-style detector on a 1x3x16x16 image: a stride-2 Conv to 8x8 anchors, then
    boxes (Sigmoid x 320: pixels) and 3 class probabilities (Sigmoid) concatenated to
    ``[1, 7, 64]``; ``tail="transpose"`` lays it out ``[1, 64, 7]`` (YOLOv5's order)."""
    rng = np.random.default_rng(seed)
    c = DETECTOR_CLASSES
    nodes = [
        helper.make_node(
            "Conv", ["x", "w1", "b1"], ["f"], "stem", pads=[1, 1, 1, 1], strides=[2, 2]
        ),
        helper.make_node("Relu", ["f"], ["r"], "stem_relu"),
        helper.make_node("Conv", ["r", "wbox", "bbox"], ["box_raw"], "box_conv"),
        helper.make_node("Conv", ["r", "wcls", "bcls"], ["cls_raw"], "cls_conv"),
        helper.make_node("Reshape", ["box_raw", "box_shape"], ["box_flat"], "box_flat"),
        helper.make_node("Reshape", ["cls_raw", "cls_shape"], ["cls_flat"], "cls_flat"),
        helper.make_node("Sigmoid", ["box_flat"], ["box_unit"], "box_sigmoid"),
        helper.make_node("Mul", ["box_unit", "pixels"], ["boxes"], "box_pixels"),
        helper.make_node("Sigmoid", ["cls_flat"], ["scores"], "cls_sigmoid"),
        helper.make_node("Concat", ["boxes", "scores"], ["head"], "head_concat", axis=1),
    ]
    out = "head"
    shape = [1, 4 + c, DETECTOR_ANCHORS]
    if tail == "transpose":
        nodes.append(
            helper.make_node("Transpose", ["head"], ["head_t"], "to_anchors", perm=[0, 2, 1])
        )
        out, shape = "head_t", [1, DETECTOR_ANCHORS, 4 + c]
    inits = [
        _init("w1", rng.normal(0, 0.5, (8, 3, 3, 3))),
        _init("b1", rng.normal(0, 0.1, 8)),
        _init("wbox", rng.normal(0, 0.5, (4, 8, 1, 1))),
        _init("bbox", rng.normal(0, 0.1, 4)),
        _init("wcls", rng.normal(0, 0.8, (c, 8, 1, 1))),
        _init("bcls", np.full(c, -1.0)),
        _init("pixels", np.array(DETECTOR_PIXELS)),
        numpy_helper.from_array(np.array([1, 4, -1], np.int64), "box_shape"),
        numpy_helper.from_array(np.array([1, c, -1], np.int64), "cls_shape"),
    ]
    graph = helper.make_graph(
        nodes,
        "detector_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)],
        inits,
    )
    return _model(graph, 17)


def image_feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Feeds for :func:`detector_head`: 1x3x16x16 images in [0, 1]."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(0, 1, (1, 3, 16, 16)).astype(np.float32)} for _ in range(count)]


def segmenter(classes: int = 5, layout: str = "nchw", seed: int = SEED) -> onnx.ModelProto:
    """Per-pixel class scores at the input's resolution: a 3x3 Conv then a 1x1 Conv to
    ``classes`` logits, on a 1x3x16x16 image (``layout="nhwc"``: input and output
    transposed to [1, 16, 16, C], as TensorFlow exports)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["f"], "features", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["f"], ["r"], "relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["logits"], "classifier"),
    ]
    image, out = [1, 3, 16, 16], [1, classes, 16, 16]
    if layout == "nhwc":
        nodes.insert(0, helper.make_node("Transpose", ["pixels"], ["image"], perm=[0, 3, 1, 2]))
        nodes.append(helper.make_node("Transpose", ["logits"], ["scores"], perm=[0, 2, 3, 1]))
        image, out = [1, 16, 16, 3], [1, 16, 16, classes]
    graph = helper.make_graph(
        nodes,
        "segmenter",
        [helper.make_tensor_value_info(nodes[0].input[0], TensorProto.FLOAT, image)],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, out)],
        [
            _init("w1", rng.normal(0, 0.5, (8, 3, 3, 3))),
            _init("w2", rng.normal(0, 0.5, (classes, 8, 1, 1))),
            _init("b2", rng.normal(0, 0.1, classes)),
        ],
    )
    return _model(graph, 13)


def token_tagger(vocabulary: int = 50, tags: int = 6, seed: int = SEED) -> onnx.ModelProto:
    """Token ids ``[1, T]`` (int64) -> ``tags`` scores per token ``[1, T, tags]``: an
    embedding lookup and a MatMul, as a tagger or a language model's head reads text."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["embedded"], "embed"),
            helper.make_node("MatMul", ["embedded", "head"], ["tags"], "head"),
        ],
        "token_tagger",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "t"])],
        [helper.make_tensor_value_info("tags", TensorProto.FLOAT, [1, "t", tags])],
        [
            _init("table", rng.normal(0, 1, (vocabulary, 16))),
            _init("head", rng.normal(0, 1, (16, tags))),
        ],
    )
    return _model(graph, 13)


def moments_layer_norm(seed: int = SEED) -> onnx.ModelProto:
    """``x [N, 16, 32]`` -> MatMul -> a LayerNorm written out as TensorFlow and JAX export
    it (variance ``E[h^2] - E[h]^2``, then ``1 / sqrt(variance + eps)``) -> MatMul + bias
    -> 8 class scores per row. On :func:`row_feeds`, rows whose mean lies far from 0
    have a variance hundreds of times smaller than ``E[h^2]``, which static int8 of the
    two terms cannot subtract (magika's first LayerNorm)."""
    rng = np.random.default_rng(seed)
    node = helper.make_node
    graph = helper.make_graph(
        [
            node("MatMul", ["x", "w_in"], ["h"], "dense_in"),
            node("ReduceSum", ["h", "last"], ["sum"], "ln_sum", keepdims=1),
            node("Mul", ["sum", "inv_width"], ["mean"], "ln_mean"),
            node("Mul", ["h", "h"], ["h2"], "ln_square"),
            node("ReduceSum", ["h2", "last"], ["sum2"], "ln_sum2", keepdims=1),
            node("Mul", ["sum2", "inv_width"], ["mean2"], "ln_mean2"),
            node("Mul", ["mean", "mean"], ["mean_sq"], "ln_mean_sq"),
            node("Sub", ["mean2", "mean_sq"], ["var_raw"], "ln_variance"),
            node("Max", ["zero", "var_raw"], ["var"], "ln_clip"),
            node("Add", ["var", "eps"], ["var_eps"], "ln_eps"),
            node("Sqrt", ["var_eps"], ["std"], "ln_std"),
            node("Reciprocal", ["std"], ["inv_std"], "ln_inv_std"),
            node("Sub", ["h", "mean"], ["centred"], "ln_centre"),
            node("Mul", ["centred", "inv_std"], ["normed"], "ln_scale"),
            node("MatMul", ["normed", "w_out"], ["logits"], "dense_out"),
            node("Add", ["logits", "b_out"], ["scores"], "bias_out"),
        ],
        "moments_layer_norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16, 32])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 16, 8])],
        [
            _init("w_in", np.eye(32) + rng.normal(0, 0.005, (32, 32))),
            numpy_helper.from_array(np.array([-1], np.int64), "last"),
            _init("inv_width", np.array(1 / 32)),
            _init("zero", np.array(0.0)),
            _init("eps", np.array(1e-6)),
            _init("w_out", rng.normal(0, 1, (32, 8))),
            _init("b_out", rng.normal(0, 3, 8)),
        ],
    )
    return _model(graph, 13)


def row_feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``x [1, 16, 32]`` for :func:`moments_layer_norm`: each row about its own mean,
    between -8 and 8, with a spread of 0.5."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(-8, 8, (count, 1, 16, 1))
    return [{"x": (mean + rng.normal(0, 0.5, (1, 16, 32))).astype(np.float32)} for mean in means]


def log_mel_head(seed: int = SEED) -> onnx.ModelProto:
    """``power [N, 40, 64]`` (a power spectrum's frames) -> MatMul by a mel filterbank ->
    + 1e-6 -> Log -> MatMul -> 8 class scores per frame: a keyword spotter's front end.
    Quiet frames' mel energies lie far below the loud ones', near 0."""
    rng = np.random.default_rng(seed)
    node = helper.make_node
    graph = helper.make_graph(
        [
            node("MatMul", ["power", "filterbank"], ["mel"], "mel"),
            node("Add", ["mel", "floor"], ["mel_floor"], "mel_floor"),
            node("Log", ["mel_floor"], ["log_mel"], "log"),
            node("MatMul", ["log_mel", "w_out"], ["scores"], "head"),
        ],
        "log_mel_head",
        [helper.make_tensor_value_info("power", TensorProto.FLOAT, ["n", 40, 64])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 40, 8])],
        [
            _init("filterbank", np.abs(rng.normal(0, 1, (64, 16))) / 16),
            _init("floor", np.array(1e-6)),
            _init("w_out", rng.normal(0, 0.3, (16, 8))),
        ],
    )
    return _model(graph, 13)


def power_feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``power [1, 40, 64]`` for :func:`log_mel_head`: frames whose loudness spans six
    decades, as speech and silence do."""
    rng = np.random.default_rng(seed)
    loudness = 10.0 ** rng.uniform(-5, 1, (count, 1, 40, 1))
    return [
        {"power": (level * rng.exponential(1, (1, 40, 64))).astype(np.float32)}
        for level in loudness
    ]


@functools.cache
def matmul_depth(milliseconds: float, rows: int, width: int) -> int:
    """How many ``[rows, width] x [width, width]`` MatMuls take ``milliseconds`` on this
    machine (onnxruntime, one thread): a slow model's cost measured here, not assumed
    (134 M multiply-adds took 1.3 ms on one machine, several on others)."""
    import onnxruntime as ort

    chain = 8
    rng = np.random.default_rng(SEED)
    nodes = [helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]) for i in range(chain)]
    graph = helper.make_graph(
        nodes,
        "matmul_chain",
        [helper.make_tensor_value_info("h0", TensorProto.FLOAT, [rows, width])],
        [helper.make_tensor_value_info(f"h{chain}", TensorProto.FLOAT, [rows, width])],
        [_init("w", rng.normal(0, 1 / np.sqrt(width), (width, width)))],
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        _model(graph, 13).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feed = {"h0": rng.normal(0, 1, (rows, width)).astype(np.float32)}
    session.run(None, feed)
    seconds = []
    for _ in range(15):
        started = time.perf_counter()
        session.run(None, feed)
        seconds.append(time.perf_counter() - started)
    per_matmul = float(np.median(seconds)) / chain
    return max(1, int(np.ceil(milliseconds / 1000 / per_matmul)))
