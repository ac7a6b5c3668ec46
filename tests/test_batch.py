"""Batching in the engine: compatible requests as one pipeline call, each getting its own result."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kiln.engine import BatchItem, GenerationRequest, compatible
from kiln.errors import GenerationCancelled, InvalidParameters

pytestmark = pytest.mark.slow

# The CPU's kernels for a batch of several round differently in the last float32 places (about 1e-7 of
# the latents), which moves an 8-bit pixel by at most 1 here: the same function, not the same bits.
PIXEL_TOLERANCE = 1


def request(family="flux", model="schnell", fmt="toy-64", **kw) -> GenerationRequest:
    fields = dict(family=family, model=model, task="t2i", format=fmt, prompt="a red circle on a blue background", seed=1)
    fields.update(kw)
    return GenerationRequest.create(**fields)


def pixels(output) -> np.ndarray:
    return np.asarray(output.image).astype(int)


def test_compatible_requests_differ_only_in_prompts_seeds_and_counts(engine):
    plan = engine.plan
    base = plan(request())
    assert compatible(base, plan(request(prompt="a green star in the middle", seed=9, num_outputs=3)))
    assert not compatible(base, plan(request(fmt="toy-96x64")))
    assert not compatible(plan(request("flux", "dev", steps=15)), plan(request("flux", "dev", steps=16)))
    assert not compatible(plan(request("flux", "dev")), plan(request("flux", "dev", negative_prompt="blurry")))
    assert not compatible(plan(request("flux", "dev")), plan(request("flux", "dev", sampler="heun")))
    assert not compatible(base, plan(request("flux", "dev")))
    assert engine.batch_key(request(upscale=1.5)) is None  # refinement passes run per output
    from helpers import png

    assert engine.batch_key(request(task="i2i", image=png(64, 64))) is None  # the input is encoded with one generator
    assert engine.batch_key(request("wan", "default", task="t2v", duration=0.5)) is None


@pytest.mark.parametrize(("family", "model", "fmt", "extra"), [
    ("flux", "schnell", "toy-64", {}),
    ("zimage", "turbo", "toy-64", {}),  # captions of different lengths, padded and masked in one batch
    ("flux", "mini", "toy-64", {"negative_prompt": "a black background", "steps": 4}),  # true CFG: two passes a step
])
def test_each_request_of_a_batch_gets_what_it_gets_alone(engine, family, model, fmt, extra):
    requests = [
        request(family, model, fmt, prompt="a red circle on a blue background", seed=5, **extra),
        request(family, model, fmt, prompt="two small green squares at the top left", seed=77, num_outputs=2, **extra),
        request(family, model, fmt, prompt="a yellow star", seed=5, **extra),
    ]
    steps: dict[int, list[int]] = {i: [] for i in range(len(requests))}
    items = [BatchItem(r, on_step=lambda e, i=i: steps[i].append(e.step)) for i, r in enumerate(requests)]
    batched = engine.generate_batch(items)
    for i, (req, result) in enumerate(zip(requests, batched, strict=True)):
        alone = engine.generate(req)
        assert [o.seed for o in result.outputs] == [o.seed for o in alone.outputs]
        for got, want in zip(result.outputs, alone.outputs, strict=True):
            assert np.abs(pixels(got) - pixels(want)).max() <= PIXEL_TOLERANCE, f"request {i} differs from alone"
        assert steps[i] == list(range(1, result.steps + 1))
    # same seed, other prompt: the batch did not hand one request another's picture
    assert not np.array_equal(pixels(batched[0].outputs[0]), pixels(batched[2].outputs[0]))


def test_a_request_that_fails_planning_gets_its_error_and_the_others_run(engine):
    outcomes = engine.generate_batch([BatchItem(request(steps=8)), BatchItem(request(seed=2))])
    assert isinstance(outcomes[0], InvalidParameters) and "always runs 4 steps" in outcomes[0].message
    assert outcomes[1].outputs and outcomes[1].seed == 2


def test_a_cancelled_request_is_dropped_and_a_fully_cancelled_batch_stops(engine):
    cancelled = threading.Event()
    cancelled.set()
    outcomes = engine.generate_batch([BatchItem(request(seed=3), cancel=cancelled), BatchItem(request(seed=4))])
    assert isinstance(outcomes[0], GenerationCancelled) and outcomes[1].outputs
    seen = []
    everyone = threading.Event()

    def on_step(event):
        seen.append(event.step)
        everyone.set()

    outcomes = engine.generate_batch([
        BatchItem(request(seed=3), cancel=everyone, on_step=on_step), BatchItem(request(seed=4), cancel=everyone),
    ])
    assert seen == [1] and all(isinstance(o, GenerationCancelled) for o in outcomes)


def test_each_item_that_asks_gets_a_preview_of_its_own_output(engine):
    events: dict[str, list] = {"a": [], "b": []}
    engine.generate_batch([
        BatchItem(request(seed=1), on_step=events["a"].append, previews=True),
        BatchItem(request(prompt="a white background", seed=2), on_step=events["b"].append, previews=True),
    ])
    a, b = events["a"][-1].preview, events["b"][-1].preview
    assert a is not None and b is not None and a.size == b.size
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_incompatible_requests_are_a_caller_error(engine):
    with pytest.raises(ValueError, match="compatible"):
        engine.generate_batch([BatchItem(request()), BatchItem(request(fmt="toy-96x64"))])
