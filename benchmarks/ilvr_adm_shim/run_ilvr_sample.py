"""Runs jychoi118/ilvr_adm's ``scripts/ilvr_sample.py`` as it is, for the whole-run benchmark.

    python run_ilvr_sample.py CHECKOUT [ilvr_sample.py's flags ...]

``ilvr.whole_runs`` starts it with this folder (the ``mpi4py`` stand-in) and CHECKOUT on PYTHONPATH.
One change, to file saving only: the script passes ``range=(-1, 1)`` to ``torchvision.utils.save_image``,
a keyword torchvision renamed ``value_range`` (0.9) and later removed, so it is renamed on the way.
"""
import runpy
import sys
from pathlib import Path

import torchvision.utils

_save_image = torchvision.utils.save_image


def save_image(tensor, fp, **kwargs):
    if "range" in kwargs:
        kwargs["value_range"] = kwargs.pop("range")
    return _save_image(tensor, fp, **kwargs)


if __name__ == "__main__":
    checkout = Path(sys.argv[1])
    script = checkout / "scripts" / "ilvr_sample.py"
    torchvision.utils.save_image = save_image
    sys.argv = [str(script), *sys.argv[2:]]
    runpy.run_path(str(script), run_name="__main__")
