"""Runs jychoi118/ilvr_adm's ``scripts/ilvr_sample.py`` as it is, for the whole-run benchmark.

    python run_ilvr_sample.py CHECKOUT [ilvr_sample.py's flags ...]

``ilvr.whole_runs`` starts it with this folder (the ``mpi4py`` stand-in) and CHECKOUT on PYTHONPATH.
Changes to file saving only: the script passes ``range=(-1, 1)`` to ``torchvision.utils.save_image``,
a keyword torchvision renamed ``value_range`` (0.9) and later removed, so it is renamed on the way.
Where torchvision is not installed (PyPI has no build of it for the CPU wheel of torch: its x86_64 wheels
need the CUDA build's libraries), ``save_image`` is the stand-in below, torchvision 0.28's code for the
one call the script makes; the script uses nothing else from torchvision.
"""
import runpy
import sys
import types
from pathlib import Path

import torch

try:
    import torchvision.utils
except ModuleNotFoundError as e:
    if e.name != "torchvision":
        raise
    torchvision = None


@torch.no_grad()
def _standin_save_image(tensor, fp, format=None, normalize=False, value_range=None, **kwargs):
    """torchvision 0.28's ``save_image`` (``make_grid`` included) for one 3-channel image, 1 x 3 x H x W."""
    if tensor.dim() != 4 or tensor.size(0) != 1 or tensor.size(1) != 3 or set(kwargs) - {"nrow"}:
        raise NotImplementedError("the torchvision stand-in saves one 1 x 3 x H x W image only")
    from PIL import Image
    if normalize:
        tensor = tensor.clone()
        low, high = value_range if value_range is not None else (float(tensor.min()), float(tensor.max()))
        tensor.clamp_(min=low, max=high)
        tensor.sub_(low).div_(max(high - low, 1e-5))
    grid = tensor.squeeze(0)
    ndarr = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()
    Image.fromarray(ndarr).save(fp, format=format)


_save_image = torchvision.utils.save_image if torchvision is not None else _standin_save_image


def save_image(tensor, fp, **kwargs):
    if "range" in kwargs:
        kwargs["value_range"] = kwargs.pop("range")
    return _save_image(tensor, fp, **kwargs)


if __name__ == "__main__":
    checkout = Path(sys.argv[1])
    script = checkout / "scripts" / "ilvr_sample.py"
    if torchvision is None:
        print("run_ilvr_sample.py: torchvision is not installed; saving with the stand-in save_image",
              file=sys.stderr)
        utils = types.ModuleType("torchvision.utils")
        package = types.ModuleType("torchvision")
        package.utils = utils
        sys.modules.update({"torchvision": package, "torchvision.utils": utils})
    else:
        utils = torchvision.utils
    utils.save_image = save_image
    sys.argv = [str(script), *sys.argv[2:]]
    runpy.run_path(str(script), run_name="__main__")
