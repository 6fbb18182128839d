"""ONNX Runtime on-device training artifacts of a trainable net: the `ort_training` backend.

In:  a net with LoRA injected that returns the loss, example inputs and their names, an output
     folder, the AdamW settings.
Out: training_model.onnx, eval_model.onnx, optimizer_model.onnx (AdamW with PyTorch semantics,
     adam_mode 0, IR <= 10 for ORT 1.19.2), frozen_weights.bin (the kept weights, fp32 or fp16,
     external initializers of both graphs) and the checkpoint (LoRA only), plus the (trainable,
     frozen) names.

The memory levers of issue 13 (`EngineLevers`, each can be switched off for the ablation bench):
attention exported query-chunked (`attention.py`), every softmax output recomputed in the backward
(`recompute.py`), every kept unit's activations recomputed in the backward (`recompute_units.py`; its
copy reads the self-attention and resnet outputs from the forward), frozen weights out of the checkpoint
in one external-data file (`frozen.py`), and an unknown batch dimension, so ORT's planner frees each
activation at its last use (`batch_dim.py`).

The training graph is traced without its weights; the frozen ones stay named graph inputs (later
external initializers in frozen_weights.bin), and the checkpoint is written from the torch tensors
directly. So neither the exporter nor `generate_artifacts` ever holds a frozen weight in a protobuf:
the latter sees a graph of a few MB whatever the model size (it peaks near 8x the bytes of the graph it
is given), and a >2 GB net never meets protobuf's 2 GB limit. ORT 1.19.2 lacks gradients or CPU kernels for three ops the U-Net exports
to; `onnx.ort_friendly` swaps the modules behind them for basic-op twins.
"""

from __future__ import annotations

import gc
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from .. import bundle as fmt
from ..hollow.lora import AdamWSettings
from .attention import chunked_attention
from .batch_dim import unknown_batch
from .frozen import attach_frozen, write_frozen_data
from .onnx import OPSET, ort_friendly
from .recompute import recompute_attention
from .recompute_units import recompute_units

MAX_ORT_IR_VERSION = 10  # ORT 1.19.2 loads IR <= 10
ARTIFACT_GRAPHS = (fmt.OPTIMIZER_MODEL, fmt.TRAINING_MODEL, fmt.EVAL_MODEL)


@dataclass
class EngineLevers:
    """The training graph's memory levers (issue 13); the defaults are the bundle format 2 build."""

    attention_chunk: int | None = 512  # query tokens per attention chunk (measured at 64x64 latents); None: whole
    recompute_attention: bool = True  # softmax outputs recomputed in the backward (recompute.py)
    recompute_units: bool = True  # each unit's activations recomputed in the backward (recompute_units.py)
    recompute_levels: int | None = None  # unit recompute only at the N highest resolutions (None: every unit)
    unit_boundaries: bool = True  # unit copies read the self-attention and resnet outputs from the forward
    frozen_external: bool = True  # frozen weights in frozen_weights.bin; False (ablation): in the checkpoint
    frozen_dtype: str = "float32"  # float32 | float16 storage of the frozen weights
    unknown_batch: bool = True  # inputs' batch dimension unknown, so ORT frees each activation at its last use (batch_dim.py)


def _weights_to_initializers(model: onnx.ModelProto, tensors: dict[str, torch.Tensor]) -> None:
    """Turn the graph inputs named in `tensors` into initializers holding those tensors' values."""
    inputs = [i for i in model.graph.input if i.name not in tensors]
    filled = [i.name for i in model.graph.input if i.name in tensors]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.graph.initializer.extend(onnx.numpy_helper.from_array(tensors[n].detach().cpu().numpy(), n) for n in filled)


def export_training_graph(net: nn.Module, args: tuple, input_names: list[str], path: Path) -> tuple[list, list]:
    """`net` (LoRA injected, returning the loss) as ONNX in TRAINING mode, frozen weights as named inputs.

    The exporter traces the graph without any weight (every parameter and buffer a named graph input);
    then the LoRA weights and the buffers become initializers again, from their torch tensors. So no
    protobuf ever holds the frozen weights, whatever their size (below 2 GB the exporter would build
    one, with two more copies of them in memory: +4.5 GB at sd21 depth 4).

    Returns (trainable names, frozen names) as they appear in the graph.
    """
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        raw = Path(scratch) / "graph.onnx"
        torch.onnx.export(net, args, str(raw), dynamo=False, opset_version=OPSET, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.TRAINING, input_names=input_names,
                          output_names=["loss"], export_params=False, keep_initializers_as_inputs=True)
        model = onnx.load(str(raw))
    graph_inputs = [i.name for i in model.graph.input]
    trainable = [n for n in graph_inputs if n in params and ".lora_" in n]
    frozen = [n for n in graph_inputs if n in params and ".lora_" not in n]
    filled = {n: params[n] for n in trainable}  # LoRA, and any buffer the graph reads
    filled.update((n, b) for n, b in buffers.items() if n in graph_inputs)
    _weights_to_initializers(model, filled)
    onnx.save(model, str(path))
    return trainable, frozen


def _pytorch_adamw(optimizer: onnx.ModelProto) -> None:
    """adam_mode 0 (PyTorch's AdamW) instead of onnxblock's default 1 (Hugging Face's)."""
    for node in optimizer.graph.node:
        if node.op_type == "AdamWOptimizer":
            for attr in node.attribute:
                if attr.name == "adam_mode":
                    attr.i = 0


def generate_training_artifacts(graph_path: Path, trainable: list[str], out: Path, optimizer: AdamWSettings) -> None:
    """training/eval/optimizer models via onnxruntime.training.artifacts; loss is the graph's first output.

    A rewrite of the exported training graph for memory belongs between `export_training_graph`
    and this call (it reads `graph_path`); a rewrite of the generated graphs belongs in the loop below.
    """
    import onnxruntime
    from onnxruntime.training import artifacts, onnxblock

    onnxruntime.set_default_logger_severity(3)  # the gradient builder logs every graph pass at INFO
    artifacts.generate_artifacts(
        onnx.load(str(graph_path)), requires_grad=trainable, frozen_params=[], loss=None,
        optimizer=onnxblock.optim.AdamW(bias_correction=True, betas=optimizer.betas, eps=optimizer.eps,
                                        weight_decay=optimizer.weight_decay),
        artifact_directory=str(out))
    for name in ARTIFACT_GRAPHS:
        model = onnx.load(str(out / name))
        if name == fmt.OPTIMIZER_MODEL:
            _pytorch_adamw(model)
        model.ir_version = min(model.ir_version, MAX_ORT_IR_VERSION)
        onnx.save(model, str(out / name))
    (out / fmt.CHECKPOINT).unlink()  # replaced by write_checkpoint


def write_checkpoint(net: nn.Module, trainable: list[str], frozen: list[str], path: Path) -> None:
    """ORT checkpoint straight from the torch tensors: LoRA trainable (and `frozen`, empty in format 2)."""
    from onnxruntime.training.onnxblock import save_checkpoint

    params = dict(net.named_parameters())

    def proto(name):
        return onnx.numpy_helper.from_array(params[name].detach().cpu().numpy(), name)
    save_checkpoint(([proto(n) for n in trainable], [proto(n) for n in frozen]), str(path))


def rewrite_training_graph(path: Path, levers: EngineLevers, input_names: list[str]) -> None:
    """The training graph at `path`, rewritten in place as `levers` say: every attention's softmax recomputed
    in the backward, then every unit's activations, then the batch dimension of `input_names` unknown."""
    model = onnx.load(str(path))
    if levers.recompute_attention:
        recompute_attention(model)
    if levers.recompute_units:
        recompute_units(model, levers.recompute_levels, levers.unit_boundaries)
    if levers.unknown_batch:
        unknown_batch(model, input_names)
    onnx.save(model, str(path))


def store_frozen(net: nn.Module, frozen: list[str], out: Path, dtype: str) -> None:
    """Stream `net`'s frozen weights into out/frozen_weights.bin, then point both graphs' inputs at it."""
    params = dict(net.named_parameters())
    table = write_frozen_data(out / fmt.FROZEN_WEIGHTS, ((n, params[n].detach().cpu().numpy()) for n in frozen), dtype)
    for name in (fmt.TRAINING_MODEL, fmt.EVAL_MODEL):
        model = onnx.load(str(out / name), load_external_data=False)
        attach_frozen(model, table)
        onnx.save(model, str(out / name))


def write_artifacts(net: nn.Module, args: tuple, input_names: list[str], out: Path,
                    settings: AdamWSettings) -> tuple[list, list]:
    """training/eval/optimizer models, frozen weights and checkpoint of `net` into `out`; returns (trainable,
    frozen) names. The levers are `settings`' when it is an `EngineLevers` too, else the defaults."""
    levers = settings if isinstance(settings, EngineLevers) else EngineLevers()
    ort_friendly(net)
    graph = out / "graph_for_artifacts.onnx"
    with torch.enable_grad(), chunked_attention(net, levers.attention_chunk):
        trainable, frozen = export_training_graph(net, args, input_names, graph)
    generate_training_artifacts(graph, trainable, out, settings)
    graph.unlink()
    gc.collect()
    if levers.recompute_attention or levers.recompute_units or levers.unknown_batch:
        rewrite_training_graph(out / fmt.TRAINING_MODEL, levers, input_names)
    if levers.frozen_external:
        store_frozen(net, frozen, out, levers.frozen_dtype)
    write_checkpoint(net, trainable, [] if levers.frozen_external else frozen, out / fmt.CHECKPOINT)
    return trainable, frozen


class OrtTrainingBackend:
    """ONNX Runtime's on-device training API (what the Android app and the Python device runtime run)."""

    name = "ort_training"

    def write_artifacts(self, net, args, input_names, out, optimizer):
        return write_artifacts(net, args, input_names, out, optimizer)
