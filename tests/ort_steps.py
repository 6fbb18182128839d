"""Test helper: N ORT training steps of a bundle (fixed random inputs), returning losses and LoRA."""

import numpy as np
from onnxruntime.training.api import CheckpointState, Module, Optimizer

from hollow_export import bundle as fmt
from hollow_export.device.ort_session import training_options


def ort_steps(folder, steps=4, lr=1e-3, options=None, seed=0, b_init=0.1):
    """Losses and final LoRA of `steps` ORT steps; lora_B starts non-zero (seeded) so every LoRA tensor moves.

    `options`: the session options; default: the bundle's own `training_session` settings.
    """
    state, module, names = _open_module(folder, options, np.random.default_rng(seed), b_init)
    optimizer = Optimizer(str(folder / fmt.OPTIMIZER_MODEL), module)
    optimizer.set_learning_rate(lr)
    module.train()
    losses = []
    inputs_meta = {i: None for i in module.input_names()}
    shapes = _shapes(folder)
    for step in range(steps):
        r = np.random.default_rng(100 + step)
        feed = []
        for name in inputs_meta:
            if name == "timestep":
                feed.append(np.array([int(r.integers(0, 1000))], dtype=np.int64))
            else:
                feed.append(r.standard_normal(shapes[name]).astype(np.float32))
        losses.append(float(module(*feed)))
        optimizer.step()
        module.lazy_reset_grad()
    lora = {n: np.array(state.parameters[n].data) for n in names}
    return np.array(losses), lora


def _open_module(folder, options, g, b_init):
    """(state, Module, LoRA names) of the bundle's training graph (`options`: default the bundle's own
    `training_session`), lora_B drawn from `g` times `b_init`, so every LoRA tensor has a gradient."""
    if options is None:
        options = training_options(fmt.open_bundle(folder, verify=False)["training_session"])
    state = CheckpointState.load_checkpoint(str(folder / fmt.CHECKPOINT))
    module = Module(str(folder / fmt.TRAINING_MODEL), state, None, session_options=options)
    names = sorted(n for n, p in state.parameters if p.requires_grad)
    for n in names:
        if "lora_B" in n:
            shape = state.parameters[n].data.shape
            state.parameters[n] = (g.standard_normal(shape) * b_init).astype(np.float32)
    return state, module, names


def _shapes(folder):
    manifest = fmt.open_bundle(folder, verify=False)
    out = {}
    for item in manifest["graphs"][fmt.TRAINING_MODEL]["inputs"]:
        out[item["name"]] = [1 if isinstance(d, str) else d for d in item["shape"]]
    return out


def build_tiny(folder, settings):
    """A bundle of the random-weight tiny pipeline (depth 3, LoRA r=4) with `settings`."""
    from hollow_export.export.build import build
    from hollow_export.hollow.plan import LoraSpec, make_plan
    from hollow_export.models.load import load_pipeline

    pipe = load_pipeline(arch="tiny")
    plan = make_plan(pipe.unet, depth=3, lora=LoraSpec(rank=4, alpha=8.0))
    build(pipe, plan, folder, "a sks dog", "a dog", settings, {"source": "tiny"})
    return folder


def forward_names(graph):
    """Independent of the package: names of the nodes the loss (first output) depends on, the forward."""
    prod = {o: n for n in graph.node for o in n.output}
    fwd, stack = set(), [prod[graph.output[0].name]]
    while stack:
        n = stack.pop()
        if n.name in fwd:
            continue
        fwd.add(n.name)
        stack += [prod[i] for i in n.input if i in prod]
    return fwd


def backward_names(graph):
    """Independent of the package: names of the nodes computed from the gradient seed `<loss>_grad` (the
    initializer ORT's gradient builder starts the backward from), the backward. A node outside it runs
    on forward tensors and weights alone, so ORT may run it during the forward."""
    readers = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    backward, stack = set(), [graph.output[0].name + "_grad"]
    while stack:
        for n in readers.get(stack.pop(), []):
            if n.name not in backward:
                backward.add(n.name)
                stack += [o for o in n.output if o]
    assert len(backward) > len(graph.node) / 3  # the seed was found: the backward is a large part of the graph
    return backward


def ancestor_names(graph, tensors):
    """Names of the nodes that `tensors` are computed from."""
    producer = {o: n for n in graph.node for o in n.output if o}
    seen, stack = set(), list(tensors)
    while stack:
        n = producer.get(stack.pop())
        if n is not None and n.name not in seen:
            seen.add(n.name)
            stack += list(n.input)
    return seen


def assert_trains_identically(folder, reference, steps=4):
    """Losses and LoRA after `steps` ORT steps of `folder` equal `reference`'s bit for bit (tolerance 0)."""
    ref_losses, ref_lora = ort_steps(reference, steps=steps)
    losses, lora = ort_steps(folder, steps=steps)
    np.testing.assert_array_equal(losses, ref_losses)
    for name in ref_lora:
        np.testing.assert_array_equal(lora[name], ref_lora[name], err_msg=name)


def assert_batch_of_two_is_the_mean(folder):
    """One step of the bundle's training graph on two samples (a runtime `batch_size` of 2) gives the mean of
    the two samples' losses (the loss is a mean over equal-size samples) and of their LoRA gradients."""
    g = np.random.default_rng(5)
    state, module, names = _open_module(folder, None, g, 0.1)
    shapes = _shapes(folder)
    pair = {name: (g.integers(0, 1000, size=2).astype(np.int64) if name == "timestep"
                   else g.standard_normal([2, *shapes[name][1:]]).astype(np.float32))
            for name in module.input_names()}
    module.train()

    def step(feed):
        loss = float(module(*[feed[name] for name in module.input_names()]))
        grads = {n: state.parameters[n].grad.copy() for n in names}
        module.lazy_reset_grad()
        return loss, grads

    halves = [step({name: value[k:k + 1] for name, value in pair.items()}) for k in (0, 1)]
    loss, grads = step(pair)
    assert halves[0][0] != halves[1][0]
    assert abs(loss - (halves[0][0] + halves[1][0]) / 2) <= 1e-5 * abs(loss)
    for n in names:
        want = (halves[0][1][n] + halves[1][1][n]) / 2
        assert np.linalg.norm(want) > 0, n
        assert np.linalg.norm(grads[n] - want) <= 1e-4 * np.linalg.norm(want), n
