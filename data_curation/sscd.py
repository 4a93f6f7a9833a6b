"""SSCD copy-detection descriptors (Pizzi et al., CVPR 2022), used for image de-duplication (Llama 3 sec. 7.1).

Model (facebookresearch/sscd-copy-detection ``sscd/models/model.py``, torchvision variant ``TV_RESNET50``):
a torchvision ResNet-50 whose ``avgpool`` is GeM pooling with p = 3 and whose ``fc`` is the projection
``Linear(2048 -> 512)``, followed by L2 normalisation. Trunk -> GeM -> linear -> L2 is exactly the
``sscd_disc_mixup`` head; keeping torchvision's module names (``backbone.conv1`` ... ``backbone.fc``) means the
official ``*.torchvision.pt`` weight files load with ``load_state_dict`` unchanged.

Weights: none ship with this repo or can be downloaded at run time. ``SSCDEmbedder.load(path)`` takes

- the official TorchScript file (``sscd_disc_mixup.torchscript.pt``; needs no SSCD code), or
- a state dict of ``SSCDModel`` (ours, or the official ``sscd_disc_*.torchvision.pt``; a bare torchvision
  ResNet state dict without the ``backbone.`` prefix is accepted too).

Preprocessing (SSCD README, "Preprocessing"): RGB, resize so the **small edge is 288** px keeping the aspect
ratio (``resize="short"``, the evaluation setting), or resize to a **320 x 320 square**, skewing on purpose
(``resize="square"``, better for batching on GPU; the README says skew is fine for copy detection); no centre
crop; ImageNet mean/std. Descriptors are 512-d (1024 for ``sscd_disc_large``) and L2-normalised; the README
calls cosine > 0.75 a copy for ``sscd_disc_mixup`` (~90% precision on DISC).

Speed (notes, random weights, 2 CPU threads): ~2.7 img/s at 288x384, ~3 img/s at 320x320. Tests use the
``tiny`` preset and small inputs.
"""

from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("short", "square")
_BLOCKS = {"bottleneck": Bottleneck, "basic": BasicBlock}


class SSCDLoadError(ValueError):
    """A weights file that is missing, unreadable, or not an SSCD model."""


@dataclass(frozen=True)
class SSCDConfig:
    block: str = "bottleneck"  # torchvision ResNet block: "bottleneck" (ResNet-50) or "basic"
    layers: tuple[int, ...] = (3, 4, 6, 3)
    dims: int = 512  # descriptor width (sscd_disc_mixup: 512)
    pool_p: float = 3.0  # GeM exponent

    def __post_init__(self):
        if self.block not in _BLOCKS:
            raise ValueError(f"unknown block {self.block!r}; expected one of {sorted(_BLOCKS)}")
        if len(self.layers) != 4:
            raise ValueError(f"layers must have 4 entries (ResNet stages), got {self.layers}")


SSCD_PRESETS = {
    "resnet50": SSCDConfig(),  # sscd_disc_mixup / sscd_imagenet_* (torchvision variant)
    "tiny": SSCDConfig(block="basic", layers=(1, 1, 1, 1)),  # tests: same code path, 1 block per stage
}


class GeM(nn.Module):
    """Generalised-mean pooling over space: (B, C, H, W) -> (B, C), ``mean(x.clamp(1e-6)^p)^(1/p)``."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p, self.eps = float(p), float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).clamp(min=self.eps).pow(self.p).mean(dim=2).pow(1.0 / self.p)


class SSCDModel(nn.Module):
    """ResNet trunk -> GeM -> Linear(C -> dims) -> L2 norm. (B, 3, H, W) -> (B, dims), unit rows."""

    def __init__(self, cfg: SSCDConfig = SSCDConfig()):
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNet(_BLOCKS[cfg.block], list(cfg.layers), num_classes=cfg.dims)
        self.backbone.avgpool = GeM(cfg.pool_p)  # torchvision flattens (B, C) -> (B, C), then fc
        # SSCD re-initialises the projection this way (model.py); it only matters for random-weight tests.
        nn.init.xavier_uniform_(self.backbone.fc.weight)
        nn.init.zeros_(self.backbone.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x), dim=-1)


def build_sscd(cfg: SSCDConfig | str = "resnet50") -> SSCDModel:
    """An SSCD model in eval mode with random weights; ``cfg`` is an ``SSCDConfig`` or a preset name."""
    if isinstance(cfg, str):
        if cfg not in SSCD_PRESETS:
            raise ValueError(f"unknown SSCD preset {cfg!r}; expected one of {sorted(SSCD_PRESETS)}")
        cfg = SSCD_PRESETS[cfg]
    return SSCDModel(cfg).eval()


def build_sscd_resnet50() -> SSCDModel:
    """The ``sscd_disc_mixup`` architecture: ResNet-50, GeM p=3, 2048 -> 512, L2 norm (random weights)."""
    return build_sscd("resnet50")


def preprocess(img: Image.Image, resize: str = "short", size: int = 288) -> torch.Tensor:
    """PIL image -> (3, H, W) normalised tensor. ``short``: small edge -> ``size``; ``square``: size x size."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; expected one of {RESIZE_MODES}")
    img = img.convert("RGB")
    img = TF.resize(img, size if resize == "short" else [size, size],
                    interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


def _is_torchscript(path: Path) -> bool:
    # torch.jit.save writes a zip with code/ and constants.pkl; torch.save writes data.pkl only.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _config_from_state_dict(sd: dict[str, torch.Tensor], path: Path) -> SSCDConfig:
    """Infer block type, blocks per stage and descriptor width from the keys and the fc shape."""
    if "backbone.fc.weight" not in sd or "backbone.conv1.weight" not in sd:
        raise SSCDLoadError(f"{path}: not an SSCD ResNet state dict (no backbone.conv1 / backbone.fc weights; "
                            f"first keys: {list(sd)[:5]})")
    block = "bottleneck" if any(".conv3." in k for k in sd) else "basic"
    layers = []
    for stage in range(1, 5):
        ids = {int(k.split(".")[2]) for k in sd if k.startswith(f"backbone.layer{stage}.")}
        if not ids:
            raise SSCDLoadError(f"{path}: state dict has no backbone.layer{stage} weights")
        layers.append(max(ids) + 1)
    return SSCDConfig(block=block, layers=tuple(layers), dims=int(sd["backbone.fc.weight"].shape[0]))


def _load_state_dict_model(path: Path) -> SSCDModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zips, non-torch files
        raise SSCDLoadError(f"{path}: not a TorchScript model or a torch state dict ({type(e).__name__}: {e})") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SSCDLoadError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    sd = {k.removeprefix("module."): v for k, v in obj.items()}
    if not any(k.startswith("backbone.") for k in sd):  # a bare torchvision ResNet state dict
        sd = {f"backbone.{k}": v for k, v in sd.items()}
    model = SSCDModel(_config_from_state_dict(sd, path))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise SSCDLoadError(f"{path}: state dict does not match the SSCD model: missing {missing[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                            f"{' ...' if len(unexpected) > 5 else ''}")
    return model.eval()


class SSCDEmbedder:
    """Images -> (N, D) float32 L2-normalised SSCD descriptors, D = 512 for ``sscd_disc_mixup``."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", resize: str = "short",
                 size: int | None = None):
        if resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {resize!r}; expected one of {RESIZE_MODES}")
        self.device = torch.device(device)
        # channels-last: oneDNN's faster convolution layout on CPU (measured 4.3 against 4.0 images/s on one
        # core at 288x384; outputs within 1e-7), and the layout cuDNN prefers on GPU
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.resize = resize
        self.size = size if size is not None else (288 if resize == "short" else 320)  # README defaults
        self._dim: int | None = None

    @classmethod
    def from_module(cls, module: nn.Module, device: str | torch.device = "cpu", **kw) -> "SSCDEmbedder":
        return cls(module, device=device, **kw)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", **kw) -> "SSCDEmbedder":
        """Official TorchScript file (``torch.jit.load``) or a state dict of ``SSCDModel``; detected by content."""
        path = Path(path)
        if not path.is_file():
            raise SSCDLoadError(f"{path}: SSCD weights file not found")
        if _is_torchscript(path):
            try:
                with warnings.catch_warnings():  # torch 2.9+ deprecates TorchScript; the SSCD releases are TorchScript
                    warnings.simplefilter("ignore", FutureWarning)
                    model = torch.jit.load(str(path), map_location=device)
            except Exception as e:
                raise SSCDLoadError(f"{path}: could not load TorchScript model ({type(e).__name__}: {e})") from e
        else:
            model = _load_state_dict_model(path)
        return cls(model, device=device, **kw)

    @property
    def dim(self) -> int:
        if self._dim is None:  # TorchScript files do not say their width: probe once
            with torch.inference_mode():
                self._dim = int(self.model(torch.zeros(1, 3, 64, 64, device=self.device)).shape[-1])
        return self._dim

    @torch.inference_mode()
    def embed(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        """(N, D) float32, unit rows, in the order of ``images``. Images are preprocessed ``8 * batch_size``
        at a time (bounded memory) and those of equal preprocessed size batched together: ``short`` mode
        keeps aspect ratios, so one batch holds one shape."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out: list[np.ndarray] = []
        window = 8 * batch_size
        for w0 in range(0, len(images), window):
            tensors = [preprocess(img, self.resize, self.size) for img in images[w0:w0 + window]]
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for i, t in enumerate(tensors):
                by_shape.setdefault(tuple(t.shape), []).append(i)
            part = [None] * len(tensors)
            for idx in by_shape.values():
                for s in range(0, len(idx), batch_size):
                    chunk = idx[s:s + batch_size]
                    x = torch.stack([tensors[i] for i in chunk]).to(self.device, memory_format=torch.channels_last)
                    # Normalise again: a TorchScript export may or may not end with L2Norm.
                    emb = F.normalize(self.model(x).float(), dim=-1).cpu().numpy()
                    for i, e in zip(chunk, emb):
                        part[i] = e
            out.extend(part)
        if not out:
            return np.zeros((0, self.dim), np.float32)
        emb = np.stack(out).astype(np.float32, copy=False)
        self._dim = emb.shape[1]
        return emb
