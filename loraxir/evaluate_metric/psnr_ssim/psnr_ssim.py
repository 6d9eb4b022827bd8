"""PSNR and SSIM (BasicSR convention) as a local 🤗 ``evaluate`` module.

It loads offline from its folder: ``evaluate.load(loraxir.metrics.evaluate_module_path())``.
The numbers come from :mod:`loraxir.metrics`, so they equal ``loraxir.metrics.psnr`` and
``loraxir.metrics.ssim``. ``evaluate`` reads this file's imports to check dependencies:
keep one import per line.
"""

import datasets
import evaluate
import numpy as np
import torch

from loraxir import metrics
from loraxir.errors import DataError

_DESCRIPTION = """
PSNR (dB, peak 255) and SSIM (11x11 Gaussian window, sigma 1.5, valid borders) per image, as
restoration papers compute them with BasicSR, averaged over the images given. Optionally on
the Y channel of BT.601 limited range, after removing `crop_border` pixels on every side.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: restored images, each an array (3, H, W) of floats in [0, 1].
    references: clean images, same shapes as the predictions.
    crop_border: pixels removed from every side before measuring (default 0).
    y_channel: measure the BT.601 limited-range luma only (default False).
    quantize: round to 8-bit levels first, as evaluating saved PNG files does (default False).
Returns:
    psnr: mean PSNR in dB over the images.
    ssim: mean SSIM over the images.
Examples:
    >>> metric = evaluate.load(loraxir.metrics.evaluate_module_path())
    >>> metric.compute(predictions=[restored], references=[clean], y_channel=True)
"""

_CITATION = """
@article{wang2004ssim,
  title={Image quality assessment: from error visibility to structural similarity},
  author={Wang, Zhou and Bovik, Alan C. and Sheikh, Hamid R. and Simoncelli, Eero P.},
  journal={IEEE Transactions on Image Processing},
  volume={13}, number={4}, pages={600--612}, year={2004}
}
"""

_IMAGE = datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("float32"))))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PsnrSsim(evaluate.Metric):
    """PSNR and SSIM in the BasicSR convention, computed by ``loraxir.metrics``."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": _IMAGE, "references": _IMAGE}),
        )

    def _compute(self, predictions, references, crop_border=0, y_channel=False, quantize=False):
        options = {"crop_border": crop_border, "y_channel": y_channel, "quantize": quantize}
        psnrs, ssims = [], []
        for prediction, reference in zip(predictions, references, strict=True):
            pred = torch.from_numpy(np.asarray(prediction, dtype=np.float32))[None]
            target = torch.from_numpy(np.asarray(reference, dtype=np.float32))[None]
            _check_unit_range(pred, target)
            psnrs.append(metrics.psnr(pred, target, **options).item())
            ssims.append(metrics.ssim(pred, target, **options).item())
        return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}


def _check_unit_range(*images):
    """The inputs arrive as float32 whatever they were (the features above), so 8-bit
    images would pass as 0-255 floats and be clamped to [0, 1]: refuse values no restorer
    output in [0, 1] comes near."""
    largest = max(float(image.abs().max()) for image in images)
    if largest > 2.0:
        raise DataError(
            f"Images must be floats in [0, 1]; got values up to {largest:g}. Divide 8-bit "
            "images by 255 (and 16-bit ones by 65535) first."
        )
