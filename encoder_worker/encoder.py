"""In-process vision encoder: the vision tower and projector of a checkpoint, never its LLM.

``Encoder.load(dir)`` reads only the vision-side tensors from the checkpoint's safetensors
(lazily mapped: the language model's bytes are never read), builds the same transformers
submodules the full model holds, and computes the namespace. ``encode(images)`` returns, per
image, exactly the tensor the language model splices in at its image-token positions:

- LLaVA: hidden state ``vision_feature_layer`` of the CLIP tower, CLS dropped for the
  ``default`` strategy, through ``multi_modal_projector`` → ``[576, hidden]`` at 336 px;
- Qwen2-VL: ``visual(pixel_values, grid_thw)`` (patch merger included), split per image →
  ``[t*h*w / merge², hidden]``, with ``image_grid_thw`` in ``extras``.

Video frames come as ``FrameGroup`` items (``encoder_worker.video``), mixed with images in one
call: LLaVA encodes a (one-frame) group as an image; Qwen2-VL patches a group's frames together
along its temporal patch (as its video processor does) and encodes it as a one-step video, with
``video_grid_thw`` ``[[1, h, w]]`` in ``extras``. The vision tower attends within one temporal
step only, so a clip encoded group by group equals the clip encoded whole.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.initialization import no_init_weights
from transformers.modeling_utils import local_torch_dtype

from encoder_worker.namespace import compute_namespace, weights_digest
from encoder_worker.video import FrameGroup

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """One image's embeddings, on the encoder's device."""

    embeddings: torch.Tensor
    """``[num_tokens, hidden]`` in the encoder's dtype: what the LLM reads for this image."""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """Small CPU tensors the LLM also needs (Qwen2-VL: ``image_grid_thw`` int64 ``[1, 3]``)."""
    encode_ms: float = 0.0
    """This image's share of its batch's wall time (preprocess + forward), split by token count."""


class _VisionModule(nn.Module):
    """What ``Encoder`` needs from an architecture: ``checkpoint_key`` (checkpoint name → own
    parameter name, or None to skip), ``num_image_tokens`` and ``encode_batch``."""

    model_type: str
    hidden_size: int

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class _LlavaVision(_VisionModule):
    """``vision_tower`` + ``multi_modal_projector`` of ``LlavaForConditionalGeneration``."""

    model_type = "llava"

    def __init__(self, config, dtype: torch.dtype) -> None:
        super().__init__()
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        # NOTE: built like LlavaModel builds them (AutoModel.from_config also installs the
        # hidden-state capture hooks that vision_feature_layer needs).
        self.vision_tower = AutoModel.from_config(config.vision_config, dtype=dtype)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.feature_layer = config.vision_feature_layer
        self.select_strategy = config.vision_feature_select_strategy
        self.hidden_size = config.text_config.hidden_size
        self.num_patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2


    def checkpoint_key(self, key: str) -> str | None:
        # Saved by transformers 5: "vision_tower.embeddings..."; llava-hf hub checkpoints:
        # "vision_tower.vision_model.embeddings..."; in-memory v5 names: "model.vision_tower...".
        key = key.removeprefix("model.")
        if key.startswith("vision_tower.vision_model."):
            key = "vision_tower." + key.removeprefix("vision_tower.vision_model.")
        return key if key.startswith(("vision_tower.", "multi_modal_projector.")) else None

    group_size = 1
    """Video frames per encoded group: each frame is an image."""

    def num_image_tokens(self, image_processor, image: Image.Image) -> int:
        return self.num_patches + (0 if self.select_strategy == "default" else 1)

    def encode_groups(self, image_processor, groups: list[FrameGroup]) -> tuple[list[torch.Tensor], list[dict]]:
        return self.encode_batch(image_processor(images=[g.frames[0] for g in groups], return_tensors="pt"))

    def encode_batch(self, batch) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        # NOTE: mirrors LlavaModel.get_image_features (transformers 5.23) step for step, so the
        # result is bit-identical to the full model's; tests/test_encoder_models.py checks it.
        pixel_values = batch["pixel_values"].to(self.device, self.dtype)
        outputs = self.vision_tower(pixel_values, output_hidden_states=self.feature_layer, return_dict=True)
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else self.feature_layer
        selected = [outputs.hidden_states[i] for i in layers]
        if self.select_strategy == "default":
            selected = [hs[:, 1:] for hs in selected]
        features = self.multi_modal_projector(selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1))
        return list(features), [{} for _ in range(features.shape[0])]


class _Qwen2VLVision(_VisionModule):
    """``visual`` (ViT + patch merger) of ``Qwen2VLForConditionalGeneration``."""

    model_type = "qwen2_vl"

    def __init__(self, config, dtype: torch.dtype) -> None:
        super().__init__()
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

        self.visual = Qwen2VisionTransformerPretrainedModel._from_config(config.vision_config, dtype=dtype)
        self.hidden_size = config.vision_config.hidden_size
        self.merge_size = config.vision_config.spatial_merge_size
        self.group_size = config.vision_config.temporal_patch_size
        """Video frames per encoded group: the temporal patch."""


    def checkpoint_key(self, key: str) -> str | None:
        # Saved (and on the hub): "visual.blocks..."; in-memory v5 names: "model.visual.blocks...".
        key = key.removeprefix("model.")
        return key if key.startswith("visual.") else None

    def num_image_tokens(self, image_processor, image: Image.Image) -> int:
        width, height = image.size
        return image_processor.get_number_of_image_patches(height, width, {}) // self.merge_size**2

    def encode_batch(self, batch) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        # NOTE: mirrors Qwen2VLModel.get_image_features: one forward over all images' patches.
        grid_thw = batch["image_grid_thw"]
        pixel_values = batch["pixel_values"].to(self.device, self.dtype)
        merged = self.visual(pixel_values, grid_thw=grid_thw.to(self.device)).pooler_output
        split_sizes = (grid_thw.prod(-1) // self.merge_size**2).tolist()
        extras = [{"image_grid_thw": grid_thw[i:i + 1].clone()} for i in range(grid_thw.shape[0])]
        return list(torch.split(merged, split_sizes)), extras

    def encode_groups(self, image_processor, groups: list[FrameGroup]) -> tuple[list[torch.Tensor], list[dict]]:
        # NOTE: the image processor resizes, rescales and normalizes each frame and patches it with
        # the frame repeated over the temporal patch: [patches, C * T * p * p] laid out (C, T, p, p).
        # A group's video patches take time step t from its frame t (what the video processor's
        # view/permute gives for a clip of T frames); the spatial order is the same.
        frames = [f for g in groups for f in g.frames]
        batch = image_processor(images=frames, return_tensors="pt")
        per_frame = torch.split(batch["pixel_values"], batch["image_grid_thw"].prod(-1).tolist())
        channels, temporal = 3, self.group_size
        patches, grids = [], []
        for i, group in enumerate(groups):
            mine = per_frame[i * temporal:(i + 1) * temporal]
            grid = batch["image_grid_thw"][i * temporal]
            if any(not torch.equal(batch["image_grid_thw"][i * temporal + k], grid) for k in range(temporal)):
                raise ValueError("the frames of a video differ in size")
            steps = [p.reshape(p.shape[0], channels, temporal, -1)[:, :, k:k + 1] for k, p in enumerate(mine)]
            patches.append(torch.cat(steps, dim=2).reshape(mine[0].shape[0], -1))
            grids.append([1, int(grid[1]), int(grid[2])])
        grid_thw = torch.tensor(grids, dtype=torch.long)
        merged = self.visual(torch.cat(patches).to(self.device, self.dtype),
                             grid_thw=grid_thw.to(self.device)).pooler_output
        split_sizes = (grid_thw.prod(-1) // self.merge_size**2).tolist()
        extras = [{"video_grid_thw": grid_thw[i:i + 1].clone()} for i in range(len(groups))]
        return list(torch.split(merged, split_sizes)), extras


_ARCHITECTURES: dict[str, type[_VisionModule]] = {"llava": _LlavaVision, "qwen2_vl": _Qwen2VLVision}


class Encoder:
    """A loaded vision encoder.

    Lifecycle: ``Encoder.load(dir)`` once per process (seconds), then ``encode`` many times. The
    weights and namespace never change after loading. ``encode`` may run in a worker thread; run
    one ``encode`` at a time per encoder (batch instead of calling concurrently).
    """

    def __init__(self, vision: _VisionModule, image_processor, namespace: str) -> None:
        self.vision = vision
        self.image_processor = image_processor
        self._namespace = namespace

    @classmethod
    def load(cls, model_dir: str | os.PathLike, device: str | torch.device = "cpu",
             dtype: torch.dtype | str | None = None, salt: str | None = None) -> "Encoder":
        """Load the vision side of the checkpoint in ``model_dir`` (local only, never the hub).

        ``dtype=None`` means float32 on the CPU, else the checkpoint's own dtype; a name such as
        ``"bfloat16"`` works too. ``salt`` (a tenant's) is mixed into the namespace.
        """
        model_dir = Path(model_dir)
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        arch = _ARCHITECTURES.get(config.model_type)
        if arch is None:
            raise ValueError(f"model_type={config.model_type!r} in {model_dir} is not supported "
                             f"({', '.join(sorted(_ARCHITECTURES))})")
        device = torch.device(device)
        if dtype is None:
            dtype = torch.float32 if device.type == "cpu" else _as_dtype(config.dtype or torch.float32)
        dtype = _as_dtype(dtype)
        config_dict = config.to_dict()  # before building: _from_config rewrites config.dtype
        t0 = time.perf_counter()
        # NOTE: built in the target dtype, as from_pretrained does, not cast after: a cast would
        # also round float32 buffers such as Qwen's rotary inv_freq, and the result would differ
        # from the full model's. load_state_dict casts the checkpoint's tensors into place.
        # no_init_weights: every parameter is overwritten from the checkpoint just below.
        with no_init_weights(), local_torch_dtype(dtype):
            vision = arch(config, dtype)
        vision.load_state_dict(_read_vision_tensors(model_dir, vision), strict=True)
        vision.eval()
        digest = weights_digest(vision.state_dict())
        vision = vision.to(device)
        image_processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        processor_dict = {**image_processor.to_dict(), "image_processor_class": type(image_processor).__name__}
        namespace = compute_namespace(config_dict, digest, processor_dict, dtype, salt)
        logger.info("loaded %s encoder from %s in %.0f ms: namespace %s, %s on %s", config.model_type, model_dir,
                    (time.perf_counter() - t0) * 1e3, namespace, dtype, device)
        return cls(vision, image_processor, namespace)

    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def model_type(self) -> str:
        return self.vision.model_type

    @property
    def hidden_size(self) -> int:
        return self.vision.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vision.parameters()).device

    @property
    def group_size(self) -> int:
        """Video frames the model encodes together (``encoder_worker.video``)."""
        return self.vision.group_size

    def num_image_tokens(self, image: Image.Image | FrameGroup) -> int:
        """How many embedding rows ``encode`` returns for ``image`` (or a frame group), without encoding it."""
        frame = image.frames[0] if isinstance(image, FrameGroup) else image
        return self.vision.num_image_tokens(self.image_processor, frame)

    @torch.inference_mode()
    def encode(self, images: list[Image.Image | FrameGroup]) -> list[EncodedImage]:
        """Encode ``images`` (and video frame groups) in one forward per kind; results in input order."""
        if not images:
            return []
        t0 = time.perf_counter()
        groups = [i for i, item in enumerate(images) if isinstance(item, FrameGroup)]
        stills = [i for i, item in enumerate(images) if not isinstance(item, FrameGroup)]
        embeddings: list = [None] * len(images)
        extras: list = [None] * len(images)
        for idx, run in ((stills, lambda items: self.vision.encode_batch(
                              self.image_processor(images=items, return_tensors="pt"))),
                         (groups, lambda items: self.vision.encode_groups(self.image_processor, items))):
            if idx:
                out, more = run([images[i] for i in idx])
                for i, e, x in zip(idx, out, more):
                    embeddings[i], extras[i] = e, x
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # NOTE: else we would time the launch, not the work
        batch_ms = (time.perf_counter() - t0) * 1e3
        total_tokens = sum(e.shape[0] for e in embeddings)
        return [EncodedImage(e, x, batch_ms * e.shape[0] / total_tokens) for e, x in zip(embeddings, extras)]


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    resolved = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"{dtype=!r} must be a floating-point torch dtype")
    return resolved


def _read_vision_tensors(model_dir: Path, vision: _VisionModule) -> dict[str, torch.Tensor]:
    """The checkpoint's vision-side tensors, renamed to ``vision``'s parameter names.

    Reads only the shards that hold them (``model.safetensors.index.json``), and only those
    tensors from each (safetensors maps files lazily).
    """
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        key_to_file = {k: f for k, f in weight_map.items() if vision.checkpoint_key(k) is not None}
    elif (model_dir / "model.safetensors").is_file():
        with safe_open(model_dir / "model.safetensors", framework="pt") as f:
            key_to_file = {k: "model.safetensors" for k in f.keys() if vision.checkpoint_key(k) is not None}
    else:
        raise ValueError(f"{model_dir} has no model.safetensors[.index.json] (other formats are not supported)")
    tensors: dict[str, torch.Tensor] = {}
    for filename in sorted(set(key_to_file.values())):
        with safe_open(model_dir / filename, framework="pt") as f:
            for key in (k for k, name in key_to_file.items() if name == filename):
                tensors[vision.checkpoint_key(key)] = f.get_tensor(key)
    if not tensors:
        raise ValueError(f"{model_dir}: no {vision.model_type} vision tensors in the checkpoint")
    return tensors
