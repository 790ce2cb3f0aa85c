"""The image adapter's batched processor: equal to one image per call, or not used at all."""

from __future__ import annotations

import pytest
import torch

from actcache.schemas.job import JobConfig
from actcache.workers.adapters import make_adapter
from actcache.workers.capture import Capture
from actcache.workers.model import load_config
from actcache.workers.selfcheck import self_check
from actcache.workers.vision import processes_independently
from tests.media import IMAGE_MODELS, write_images


def image_adapter(model: str):
    job = JobConfig(model=model, inputs="in.jsonl", store="s.zarr", image_column="image")
    return make_adapter(job, load_config(model), None, "right")


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_batched_processor_gives_each_images_own_values(tmp_path, media_models, name):
    adapter = image_adapter(media_models(name))
    refs = [str(p) for p in write_images(tmp_path)]  # mixed sizes, grey and colour
    assert adapter.batched_processor, f"{name}: its processor should run over many images"
    batched = adapter.encode(refs)
    adapter.batched_processor = False
    alone = adapter.encode(refs)
    assert batched.lengths == alone.lengths
    assert batched.extra["grid"] == alone.extra["grid"]
    for i, (got, want) in enumerate(zip(batched.examples, alone.examples, strict=True)):
        assert torch.equal(got["pixel_values"], want["pixel_values"]), f"{name}: image {i}"


def _vit_processor(**config):
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(**config)


@pytest.mark.parametrize(
    ("make", "channels", "batched"),
    [
        pytest.param(lambda: _vit_processor(size={"height": 32, "width": 32}), 3, True,
                     id="fixed-resize"),
        pytest.param(lambda: _vit_processor(size={"shortest_edge": 32}), 3, False,
                     id="aspect-keeping-resize"),
        pytest.param(lambda: _vit_processor(do_resize=False), 3, False, id="no-resize"),
        pytest.param(lambda: _vit_processor(size={"height": 32, "width": 32}, do_pad=True), 3,
                     False, id="pads-to-the-largest"),
        pytest.param(lambda: _vit_processor(size={"height": 32, "width": 32}), 1, False,
                     id="single-channel-model"),
        pytest.param(lambda: __import__("transformers").BeitImageProcessorPil(
            size={"height": 32, "width": 32}), 3, False, id="own-preprocess-override"),
    ],
)
def test_only_independent_fixed_size_processors_batch(make, channels, batched):
    assert processes_independently(make(), channels) is batched


def _vit_capture(model_path: str) -> Capture:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_path).eval()
    return Capture(model, [0, 1, 2], 2, ["first", "mean", "tokens"])


def test_self_check_keeps_an_exact_batched_processor(tmp_path, media_models):
    model = media_models("vit")
    adapter = image_adapter(model)
    refs = [str(p) for p in write_images(tmp_path)][:4]
    with torch.inference_mode():
        record = self_check(_vit_capture(model), adapter, refs, 1e-4, model)
    assert record["batched_processor"] is True and adapter.batched_processor


def test_self_check_falls_back_to_one_image_per_call(tmp_path, media_models):
    model = media_models("vit")
    adapter = image_adapter(model)
    process = adapter._process

    def drifting(images):
        # A processor whose output depends on the other images of the call.
        values = process(images)
        return [v + 0.5 * (len(images) > 1) for v in values]

    adapter._process = drifting
    refs = [str(p) for p in write_images(tmp_path)][:4]
    with torch.inference_mode():
        record = self_check(_vit_capture(model), adapter, refs, 1e-4, model)
    assert record["batched_processor"] is False and not adapter.batched_processor
    assert record["max_rel_error"] <= 1e-4
