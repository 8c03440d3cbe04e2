"""How the files beside this script were made (run once by hand; the tests only read them).

Real Keras 3.15.1 (``KERAS_BACKEND=torch``) builds zhixuhao's ``unet()`` (zhixuhao/unet, model.py)
at depth 2, base width 2, 2 input channels, 8x8 input, gives every bias random values (he_normal
leaves them 0), and saves it three ways:

* ``unet.weights.h5``: ``model.save_weights`` (Keras 3 layout, /layers/conv2d_N/vars/i)
* ``unet_full.h5``: ``model.save("unet_full.h5")`` (legacy tf.keras 2 full-model layout)
* ``unet_weights_legacy.h5``: ``legacy_h5_format.save_weights_to_hdf5_group`` (tf.keras 2
  ``save_weights`` layout)

plus ``x_nhwc.npy`` (2 random images) and ``y_nhwc.npy`` (Keras' own ``model.predict`` on them).
``tests/test_convert.py`` loads each file with ``fastunet.UNet.from_keras`` (no Keras needed)
and compares with ``y_nhwc.npy``. Usage: ``python make_fixtures.py OUT_DIR`` in an environment
with keras, torch and h5py.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras.layers import Conv2D, Dropout, Input, MaxPooling2D, UpSampling2D, concatenate  # noqa: E402
from keras.src.legacy.saving import legacy_h5_format  # noqa: E402


def conv(width, k=3, activation="relu"):
    return Conv2D(width, k, activation=activation, padding="same", kernel_initializer="he_normal")


def unet(input_size, base, depth):
    """zhixuhao's unet() with the width and depth as parameters (64 and 4 there)."""
    inputs = Input(input_size)
    x, skips = inputs, []
    for i in range(depth):
        x = conv(base * 2**i)(x)  # one statement per layer: created in the order they are applied
        x = conv(base * 2**i)(x)
        if i == depth - 1:
            x = Dropout(0.5)(x)
        skips.append(x)
        x = MaxPooling2D(pool_size=(2, 2))(x)
    x = conv(base * 2**depth)(x)
    x = conv(base * 2**depth)(x)
    x = Dropout(0.5)(x)
    for i in reversed(range(depth)):
        up = Conv2D(base * 2**i, 2, activation="relu", padding="same", kernel_initializer="he_normal")(
            UpSampling2D(size=(2, 2))(x)
        )
        x = conv(base * 2**i)(concatenate([skips[i], up], axis=3))
        x = conv(base * 2**i)(x)
    x = conv(2)(x)
    return keras.Model(inputs=inputs, outputs=Conv2D(1, 1, activation="sigmoid")(x))


def main(out_dir, base=2, depth=2, in_ch=2, size=8):
    os.makedirs(out_dir, exist_ok=True)
    keras.utils.set_random_seed(0)
    model = unet((size, size, in_ch), base, depth)
    rng = np.random.default_rng(0)
    model.set_weights([w if w.ndim == 4 else rng.normal(0, 0.1, w.shape).astype(w.dtype) for w in model.get_weights()])
    x = rng.standard_normal((2, size, size, in_ch)).astype(np.float32)
    np.save(f"{out_dir}/x_nhwc.npy", x)
    np.save(f"{out_dir}/y_nhwc.npy", np.asarray(model.predict(x, verbose=0)))
    model.save_weights(f"{out_dir}/unet.weights.h5")
    model.save(f"{out_dir}/unet_full.h5")
    with h5py.File(f"{out_dir}/unet_weights_legacy.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


if __name__ == "__main__":
    main(sys.argv[1])
