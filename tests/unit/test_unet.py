"""The U-Net's structure, saving, and the precision choice (hipoa.unet, hipoa.precision)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from hipoa import precision
from hipoa.precision import choose_policy, cpu_flags, with_policy
from hipoa.unet import OUTPUT_LAYER, build_unet


def test_parameter_count_by_hand():
    # depth 1, 2 base filters: conv 1->2, 2->2; bottleneck 2->4, 4->4; up-conv 2x2 4->2;
    # concat 2+2 -> conv 4->2, 2->2; 1x1 logits 2->2 (weights + biases)
    expected = (9 * 1 * 2 + 2) + (9 * 2 * 2 + 2) + (9 * 2 * 4 + 4) + (9 * 4 * 4 + 4) + (4 * 4 * 2 + 2) \
        + (9 * 4 * 2 + 2) + (9 * 2 * 2 + 2) + (1 * 2 * 2 + 2)
    assert build_unet(depth=1, base_filters=2).count_params() == expected == 434


def test_shapes_softmax_and_paper_choices():
    model = build_unet(depth=2, base_filters=4)
    x = np.random.default_rng(0).normal(size=(2, 128, 128, 1)).astype(np.float32)
    y = keras.ops.convert_to_numpy(model(x, training=False))
    assert y.shape == (2, 128, 128, 2) and y.dtype == np.float32
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, atol=1e-5)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert all(layer.padding == "same" for layer in convs)
    assert all(type(layer.kernel_initializer).__name__ == "HeNormal" for layer in convs)
    drops = {layer.name: layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)}
    assert drops == {"enc1_dropout": 0.3, "bottleneck_dropout": 0.3}
    # the deepest feature map is 128 / 2**depth, with base * 2**depth filters
    assert model.get_layer("bottleneck_conv2").output.shape[1:] == (32, 32, 16)


def test_paper_size_is_the_original_unet():
    model = build_unet()  # depth 4, 64 base filters
    assert model.get_layer("bottleneck_conv2").output.shape[1:] == (8, 8, 1024)
    assert 31_000_000 < model.count_params() < 31_100_000  # the original U-Net's ~31 M


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="divisible"):
        build_unet(size=100, depth=3)
    with pytest.raises(ValueError, match="dropout"):
        build_unet(depth=1, base_filters=2, dropout=1.0)


def test_mixed_precision_keeps_float32_output_and_saves_portable(tmp_path):
    mixed = build_unet(depth=2, base_filters=4, dtype="mixed_bfloat16")
    assert mixed.get_layer("enc0_conv1").compute_dtype == "bfloat16"
    assert mixed.get_layer(OUTPUT_LAYER).compute_dtype == "float32"
    x = np.random.default_rng(1).normal(size=(2, 128, 128, 1)).astype(np.float32)
    y_mixed = keras.ops.convert_to_numpy(mixed(x, training=False))
    assert y_mixed.dtype == np.float32

    f32 = with_policy(mixed, "float32")
    assert all(layer.compute_dtype == "float32" for layer in f32.layers)
    y32 = keras.ops.convert_to_numpy(f32(x, training=False))
    np.testing.assert_allclose(y32, y_mixed, atol=0.05)  # bfloat16 has ~3 significant digits
    f32.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x, training=False)), y32)
    back = with_policy(loaded, "mixed_bfloat16")
    assert back.get_layer("enc0_conv1").compute_dtype == "bfloat16"
    assert back.get_layer(OUTPUT_LAYER).compute_dtype == "float32"


def test_cpu_flags_choose_bfloat16(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "_gpu_compute_capabilities", lambda: [])
    with_bf16 = tmp_path / "cpuinfo_bf16"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    plain = tmp_path / "cpuinfo_plain"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    assert "avx512_bf16" in cpu_flags(with_bf16)
    assert choose_policy("auto", cpuinfo=with_bf16) == "mixed_bfloat16"
    assert choose_policy("auto", cpuinfo=plain) == "float32"
    assert choose_policy("auto", cpuinfo=tmp_path / "missing") == "float32"
    assert choose_policy("mixed_float16", cpuinfo=plain) == "mixed_float16"
    with pytest.raises(ValueError, match="'fp8'"):
        choose_policy("fp8")


@pytest.mark.parametrize(("cc", "policy"), [((8, 0), "mixed_bfloat16"), ((9, 0), "mixed_bfloat16"),
                                           ((7, 0), "mixed_float16"), ((6, 1), "float32")])
def test_gpu_compute_capability_chooses(monkeypatch, tmp_path, cc, policy):
    monkeypatch.setattr(precision, "_gpu_compute_capabilities", lambda: [cc])
    assert choose_policy("auto", cpuinfo=tmp_path / "none") == policy


def test_written_model_bytes_depend_on_the_model_only(tmp_path):
    import hashlib
    import time

    import keras

    from hipoa.modelio import write_model
    from hipoa.unet import build_unet

    keras.utils.set_random_seed(0)
    model = build_unet(depth=2, base_filters=4)
    write_model(model, tmp_path / "a.keras")
    time.sleep(1.1)  # Keras would stamp a new save date and file times
    write_model(model, tmp_path / "b.keras")
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.keras", "b.keras")]
    assert digest[0] == digest[1]
    again = keras.saving.load_model(tmp_path / "a.keras", compile=False)
    x = np.random.default_rng(0).normal(size=(1, 128, 128, 1)).astype("float32")
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6)
