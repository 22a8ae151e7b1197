"""Network factory (segmentation_models_pytorch), projection head and self-describing checkpoints.

``SegModel.forward_features`` gives the decoder features that both heads share: the segmentation head
(``forward``, the only path that is exported) and the projection head (``project``, contrastive
pretraining only). A checkpoint holds the model and preprocessing config, the classes, version, step and
metrics, so :func:`load_checkpoint` rebuilds the model from the file alone.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelsmart.config import Config, ModelConfig
from labelsmart.imageio import atomic_write_bytes

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "labelsmart-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what to do."""


class ProjectionHead(nn.Module):
    """1x1 conv C->hidden, ReLU, 1x1 conv hidden->D, L2 normalisation over channels."""

    def __init__(self, in_channels: int, out_channels: int = 256, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, kernel_size=1),
        )

    def forward(self, feats: Tensor) -> Tensor:
        """Project features ``(B, C, h, w)`` to unit-length embeddings ``(B, D, h, w)``."""
        return F.normalize(self.net(feats), dim=1)  # (B, D, h, w)


def _decoder_kwargs(arch: str, channels: int) -> dict[str, Any]:
    """Map ``ModelConfig.decoder_channels`` onto the keyword the smp architecture takes, if any."""
    try:
        cls = smp.MODEL_ARCHITECTURES_MAPPING[arch.lower()]
    except KeyError as exc:
        names = sorted(c.__name__ for c in smp.MODEL_ARCHITECTURES_MAPPING.values())
        raise ValueError(f"unknown architecture {arch!r}; pick one of {names}.") from exc
    params = inspect.signature(cls.__init__).parameters
    if "decoder_channels" in params:
        default = params["decoder_channels"].default
        if isinstance(default, int):  # DeepLabV3(+), PAN, UPerNet
            return {"decoder_channels": channels}
        if isinstance(default, tuple | list):  # Unet, Unet++, MAnet: one width per decoder block
            c = channels
            widths = (4 * c, 2 * c, c, max(c // 2, 8), max(c // 4, 8))
            return {"decoder_channels": widths[: len(default)]}
    if "decoder_segmentation_channels" in params:  # FPN, Segformer
        return {"decoder_segmentation_channels": channels}
    return {}


def _encoder_state(path: Path) -> dict[str, Tensor]:
    """Read an encoder state dict from a local file (plain, ``{"state_dict": ...}`` or a whole smp model)."""
    if not path.is_file():
        raise ValueError(
            f"{path}: encoder weights file not found; give a local weights file or none (nothing is downloaded)."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable PyTorch weights file ({exc}); give a state-dict file.") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: holds no state dict; give a file saved with torch.save(module.state_dict()).")
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        for prefix in ("net.encoder.", "encoder.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
                break
        out[k] = v
    return out


class SegModel(nn.Module):
    """An smp encoder-decoder whose decoder features feed a segmentation head and a projection head.

    Attributes:
        net: the smp model (encoder, decoder, segmentation head).
        proj_head: projection head used only in contrastive pretraining (never exported).
        feature_channels: C, the width of :meth:`forward_features`.
        num_classes: K.
    """

    def __init__(self, mcfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError("a model needs at least one class; add classes before training.")
        self.mcfg = mcfg
        self.num_classes = num_classes
        self.net = smp.create_model(
            arch=mcfg.arch,
            encoder_name=mcfg.encoder,
            encoder_weights=None,  # never download; a local file is loaded below
            in_channels=3,
            classes=num_classes,
            **_decoder_kwargs(mcfg.arch, mcfg.decoder_channels),
        )
        self.feature_channels: int = int(self.net.segmentation_head[0].in_channels)
        self.proj_head = ProjectionHead(self.feature_channels, mcfg.proj_dim)
        if mcfg.encoder_weights:
            self.load_encoder_weights(Path(mcfg.encoder_weights))

    def load_encoder_weights(self, path: Path) -> None:
        """Load a local encoder state dict (strict=False; missing and unexpected keys are logged)."""
        state = _encoder_state(path)
        encoder = self.net.encoder
        own = encoder.state_dict()
        if not set(state) & set(own) and any(k.startswith("model.") for k in own):
            state = {f"model.{k}": v for k, v in state.items()}  # timm weights into smp's "tu-" wrapper
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        missing = [k for k in own if k not in usable]
        encoder.load_state_dict(usable, strict=False)  # smp encoders return None here
        log.info(
            "encoder weights %s: %d tensors loaded, %d missing, %d unexpected or mismatched",
            path,
            len(usable),
            len(missing),
            len(state) - len(usable),
        )
        if missing:
            log.warning("encoder weights %s: missing keys %s", path, missing[:20])
        if not usable:
            raise ValueError(f"{path}: no tensor matches encoder {self.mcfg.encoder!r}; give weights of that encoder.")

    def forward_features(self, x: Tensor) -> Tensor:
        """Decoder features shared by both heads: ``(B, 3, H, W)`` -> ``(B, C, h, w)``."""
        feats = self.net.encoder(x)  # list of (B, C_i, H / 2^i, W / 2^i)
        return self.net.decoder(feats)  # (B, C, h, w)

    def forward_head(self, feats: Tensor) -> Tensor:
        """Segmentation logits ``(B, K, H, W)`` of decoder features ``(B, C, h, w)`` (upsampled to the input size)."""
        return self.net.segmentation_head(feats)  # (B, K, H, W)

    def forward(self, x: Tensor) -> Tensor:
        """Segmentation logits ``(B, K, H, W)`` at the input resolution (H, W multiples of 32)."""
        return self.forward_head(self.forward_features(x))  # (B, K, H, W)

    def project(self, feats: Tensor) -> Tensor:
        """Unit-length contrastive embeddings ``(B, D, h, w)`` of features ``(B, C, h, w)``."""
        return self.proj_head(feats)  # (B, D, h, w)


def build_model(mcfg: ModelConfig, num_classes: int) -> SegModel:
    """The network for ``num_classes`` classes, randomly initialised unless ``mcfg.encoder_weights`` is a file."""
    model = SegModel(mcfg, num_classes)
    n = sum(p.numel() for p in model.parameters())
    log.info("model %s/%s, %d classes, %.1fM parameters", mcfg.arch, mcfg.encoder, num_classes, n / 1e6)
    return model


def save_checkpoint(
    path: Path,
    model: SegModel,
    cfg: Config,
    classes: list[dict[str, Any]],
    version: int,
    step: int,
    metrics: dict[str, Any],
) -> None:
    """Write a self-describing checkpoint atomically (temporary file in the same folder, fsync, replace).

    Args:
        path: target file (``.../model.pt``).
        model: the network; its state dict (projection head included) is saved on the CPU.
        cfg: configuration; its model and preprocess sections are stored.
        classes: ``[{"id", "name", "color"}]`` in id order.
        version: model version number.
        step: optimisation steps done.
        metrics: round metrics (JSON-like values).
    """
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "model_state": state,
        "model": dataclasses.asdict(cfg.model),
        "preprocess": dataclasses.asdict(cfg.preprocess),
        "classes": [
            {"id": int(c["id"]), "name": str(c["name"]), "color": [int(v) for v in c["color"]]} for c in classes
        ],
        "num_classes": int(model.num_classes),
        "version": int(version),
        "step": int(step),
        "metrics": metrics,
    }
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(Path(path), buf.getvalue())
    log.info("saved checkpoint %s (version %d, step %d)", path, version, step)


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw checkpoint dictionary, checked for the fields a model is rebuilt from.

    Raises:
        CheckpointError: the file is missing, corrupt or not a labelsmart checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; train a model first or give the path of a model.pt.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: corrupt or not a labelsmart checkpoint ({type(exc).__name__}); retrain or pick another model.pt."
        ) from exc
    required = ("model_state", "model", "preprocess", "classes", "num_classes")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or any(k not in ckpt for k in required):
        raise CheckpointError(f"{path}: not a labelsmart checkpoint; retrain or pick another model.pt.")
    return ckpt


def model_config_of(ckpt: Mapping[str, Any]) -> ModelConfig:
    """The ModelConfig stored in a checkpoint (encoder weights cleared: the state dict holds them)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {k: v for k, v in ckpt["model"].items() if k in fields}
    return dataclasses.replace(ModelConfig(**values), encoder_weights=None)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> tuple[SegModel, dict[str, Any]]:
    """Rebuild a model from its checkpoint file alone.

    Returns:
        ``(model in eval mode, checkpoint dict)``; the dict holds ``model``, ``preprocess``, ``classes``,
        ``num_classes``, ``version``, ``step``, ``metrics`` (and ``model_state``).

    Raises:
        CheckpointError (a ValueError): the file is missing, corrupt or not a labelsmart checkpoint.
    """
    path = Path(path)
    ckpt = read_checkpoint(path, map_location=map_location)
    try:
        model = SegModel(model_config_of(ckpt), int(ckpt["num_classes"]))
        model.load_state_dict(ckpt["model_state"])
    except (RuntimeError, TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{path}: the weights do not fit the model the checkpoint describes ({exc}); retrain or pick another "
            "model.pt."
        ) from exc
    model.to(map_location)
    model.eval()
    return model, ckpt
