"""The per-site U-Net (Ronneberger et al. 2015, with the changes of Ebsim et al., section 3 and 4.2).

Architecture, for ``depth`` = d and ``base_filters`` = f:

- input ``(128, 128, 1)`` float32 (one normalised patch);
- encoder level k = 0..d-1: two 3x3 convolutions with f * 2**k filters and ReLU, then 2x2 max
  pooling; the bottleneck has two 3x3 convolutions with f * 2**d filters;
- decoder level k = d-1..0: 2x upsampling followed by a 2x2 convolution with f * 2**k filters
  (the original "up-convolution"), concatenation with the encoder level's features (the skip
  connection), two 3x3 convolutions;
- a 1x1 convolution to ``n_classes`` and a per-pixel softmax, output ``(128, 128, n_classes)``.

The paper's changes from the original: 128x128 input, "same" zero padding (so the output has the
input's size and no cropping of the skip connections is needed), He-normal initialisation, and
dropout 0.3. Dropout sits where the common Keras U-Net ports (e.g. zhixuhao/unet) put it: after
the deepest encoder block (before its pooling) and after the bottleneck block.

``depth=4, base_filters=64`` is the original and the paper's size (about 31 M parameters).
"""

from __future__ import annotations

import keras
from keras import layers

OUTPUT_LAYER = "softmax_float32"
"""Name of the output softmax; the ``_float32`` suffix pins it to float32 under mixed precision."""


def _conv_block(x, filters: int, name: str, dtype):
    for i in (1, 2):
        x = layers.Conv2D(
            filters,
            3,
            padding="same",
            activation="relu",
            kernel_initializer="he_normal",
            name=f"{name}_conv{i}",
            dtype=dtype,
        )(x)
    return x


def build_unet(
    *,
    size: int = 128,
    depth: int = 4,
    base_filters: int = 64,
    dropout: float = 0.3,
    n_classes: int = 2,
    dtype: str | None = None,
) -> keras.Model:
    """Build the U-Net.

    Args:
        size: Side of the square input patch in pixels; must be divisible by ``2**depth``.
        depth: Number of 2x2 poolings (4 in the original U-Net).
        base_filters: Filters of the first level; doubled at each level (64 in the original).
        dropout: Dropout rate after the deepest encoder block and the bottleneck (0.3 in the paper).
        n_classes: Output classes per pixel; class 1 is "osteophyte" for the two-class model.
        dtype: Keras dtype policy for the hidden layers (e.g. ``"mixed_bfloat16"``); ``None``
            uses the global policy. The output softmax is always float32.

    Returns:
        A functional ``keras.Model`` mapping ``(batch, size, size, 1)`` float32 to
        ``(batch, size, size, n_classes)`` float32 class probabilities.

    Raises:
        ValueError: naming the value when the sizes do not fit together.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if base_filters < 1:
        raise ValueError(f"base_filters must be >= 1, got {base_filters}")
    if size % (2**depth):
        raise ValueError(f"size {size} is not divisible by 2**depth = {2**depth}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")

    inputs = keras.Input(shape=(size, size, 1), name="patch")
    x = inputs
    skips = []
    for k in range(depth):
        x = _conv_block(x, base_filters * 2**k, f"enc{k}", dtype)
        if k == depth - 1 and dropout > 0:
            x = layers.Dropout(dropout, name=f"enc{k}_dropout", dtype=dtype)(x)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{k}_pool", dtype=dtype)(x)
    x = _conv_block(x, base_filters * 2**depth, "bottleneck", dtype)
    if dropout > 0:
        x = layers.Dropout(dropout, name="bottleneck_dropout", dtype=dtype)(x)
    for k in reversed(range(depth)):
        filters = base_filters * 2**k
        x = layers.UpSampling2D(2, name=f"dec{k}_up", dtype=dtype)(x)
        x = layers.Conv2D(
            filters, 2, padding="same", activation="relu", kernel_initializer="he_normal",
            name=f"dec{k}_upconv", dtype=dtype,
        )(x)
        x = layers.Concatenate(name=f"dec{k}_concat", dtype=dtype)([skips[k], x])
        x = _conv_block(x, filters, f"dec{k}", dtype)
    logits = layers.Conv2D(n_classes, 1, padding="same", kernel_initializer="he_normal", name="logits", dtype=dtype)(x)
    # Softmax in float32: 16-bit probabilities would round near 0 and 1 (and the loss with them).
    outputs = layers.Activation("softmax", dtype="float32", name=OUTPUT_LAYER)(logits)
    return keras.Model(inputs, outputs, name=f"unet_d{depth}_f{base_filters}")
