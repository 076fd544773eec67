"""UCI handwritten digits, as shipped inside scikit-learn's wheel (no network needed).

1,797 grey-scale 8x8 images, pixel intensity 0 (background) to 16 (ink), 10 classes. The model
sees intensity / 16 in [0, 1]; the manifest records that scaling so clients repeat it.
"""

from __future__ import annotations

import numpy as np

from .base import CLASSIFICATION, Dataset, split_indices

SPLIT_SEED = 0  # the split is fixed: every version of "digits" is evaluated on the same test set
PIXEL_MAX = 16.0


def load_digits() -> Dataset:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = bunch.images.astype(np.float32) / PIXEL_MAX
    x = images[..., np.newaxis]  # (n, 8, 8, 1): channels-last, what Conv2D, TF.js and TFLite expect
    y = bunch.target.astype(np.int64)
    train, val, test = split_indices(len(y), stratify=y, seed=SPLIT_SEED)
    return Dataset(
        name="digits",
        task=CLASSIFICATION,
        kind="image",
        x_train=x[train], y_train=y[train],
        x_val=x[val], y_val=y[val],
        x_test=x[test], y_test=y[test],
        labels=[str(d) for d in range(10)],
        target="digit",
        description="UCI handwritten digits (scikit-learn), 8x8 grey-scale, 10 classes",
        preprocessing={
            "kind": "image",
            "layout": "HWC",
            "height": 8,
            "width": 8,
            "channels": 1,
            "source_range": [0, PIXEL_MAX],
            "background": "low",  # 0 is background, 16 is ink: invert a dark-on-light drawing
            "scale": 1.0 / PIXEL_MAX,
            "offset": 0.0,
            "formula": "x = pixel * scale + offset",
        },
    )
