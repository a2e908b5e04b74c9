"""Mid-level metric: LPIPS (Zhang et al. 2018) with the AlexNet trunk, through the lpips package.

The calibrated linear layers ship inside the lpips package. The AlexNet trunk needs ImageNet
weights, which are never downloaded: they are used when the torchvision checkpoint is present
locally (``torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth``, or a path given in the
config or in ``BUDGETDIFF_ALEXNET_WEIGHTS``), and the metric is then ``mid/lpips_alex``.
Otherwise the trunk is randomly initialised with a fixed seed (so values are comparable between
runs) and the metric is named ``mid/lpips_alex_randinit``, with a one-time warning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ALEXNET_IMAGENET_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_NAME = "mid/lpips_alex"
LPIPS_RANDINIT_NAME = "mid/lpips_alex_randinit"
RANDINIT_SEED = 0
_warned_randinit = False


def find_alexnet_weights(path: str | os.PathLike | None = None) -> Path | None:
    """The local ImageNet AlexNet checkpoint: ``path`` if given (must exist), else
    ``$BUDGETDIFF_ALEXNET_WEIGHTS``, else the torch hub cache; None when there is none."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"AlexNet weights {str(path)!r} not found")
        return path
    candidates = [os.environ.get("BUDGETDIFF_ALEXNET_WEIGHTS"),
                  str(Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_IMAGENET_FILE)]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


class LpipsMetric(torch.nn.Module):
    """LPIPS distance per image pair (0 for identical images; larger is more different).

    Args:
        alexnet_weights: path of torchvision's ImageNet AlexNet checkpoint; default: looked up
            by ``find_alexnet_weights`` (never downloaded).
        min_size: images smaller than this (pixels) are upsampled bilinearly to it first, so
            that AlexNet's deeper layers keep a spatial extent (default 64; 32x32 scenes would
            otherwise shrink to 1x1 after the second pooling).
    """

    def __init__(self, alexnet_weights: str | os.PathLike | None = None, min_size: int = 64):
        super().__init__()
        import lpips

        global _warned_randinit
        weights = find_alexnet_weights(alexnet_weights)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated"
            torch.manual_seed(RANDINIT_SEED)
            self.lpips = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
            for slice_ in (self.lpips.net.slice1, self.lpips.net.slice2, self.lpips.net.slice3,
                           self.lpips.net.slice4, self.lpips.net.slice5):
                for index, layer in slice_.named_children():
                    if isinstance(layer, torch.nn.Conv2d):
                        layer.weight.data.copy_(features[f"{index}.weight"])
                        layer.bias.data.copy_(features[f"{index}.bias"])
            self.name = LPIPS_NAME
        else:
            self.name = LPIPS_RANDINIT_NAME
            if not _warned_randinit:
                warnings.warn(f"no local ImageNet AlexNet weights ({ALEXNET_IMAGENET_FILE} in the torch hub cache "
                              f"or BUDGETDIFF_ALEXNET_WEIGHTS): LPIPS uses a randomly initialised trunk and is "
                              f"reported as {LPIPS_RANDINIT_NAME}", stacklevel=2)
                _warned_randinit = True
        self.min_size = int(min_size)
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        """LPIPS of each image (N, 3, H, W) in [0, 1] against its reference; returns (N,)."""
        from budgetdiff.metrics.pixel import check_pair

        check_pair(images, refs)
        if min(images.shape[-2:]) < self.min_size:
            size = (max(self.min_size, images.shape[-2]), max(self.min_size, images.shape[-1]))
            images = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)
            refs = F.interpolate(refs.float(), size=size, mode="bilinear", align_corners=False)
        return self.lpips(images * 2 - 1, refs * 2 - 1, normalize=False).flatten()
