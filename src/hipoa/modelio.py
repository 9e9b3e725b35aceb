"""Reading a site's model (``unet.keras``) and its model card (``unet.json``), one way for every stage.

Inference (:class:`hipoa.infer.SiteModel`, used by prediction, evaluation and the presence-rule
choice) and ``train-unet --load`` (:func:`install_model`) load models through :func:`load_model`,
which checks the file before Keras touches it:

- a regular file (not a directory or FIFO);
- a zip archive that passes its CRC checks (a truncated or corrupt download is named as such);
- holding ``config.json`` and ``model.weights.h5``;
- whose ``config.json`` parses and names only Keras's own classes: every nested ``module`` is
  ``keras`` or ``keras.*``, every class exists there (or is registered with Keras), and no
  ``Lambda`` layer, ``__lambda__`` or non-Keras function is in it, so loading runs no code from
  the file.

It then loads with ``keras.saving.load_model(path, compile=False, safe_mode=True)`` and checks the
shapes: input ``(128, 128, 1)``, output ``(128, 128, k)``. Every problem is a :class:`ModelError`
(a ``ValueError``) with a one-line message naming the file, which the CLI prints without a
traceback.

The model card, the JSON beside the model (``unet.json`` beside ``unet.keras``), is a
:class:`ModelCard`: settings, data counts, training and validation figures, the presence rule
(:class:`PresenceRule`) and, in ``presence.calibration``, the calibration of the presence score
(:class:`hipoa.calibration.Calibration`; older cards have none and read as uncalibrated). It is
read by :func:`read_model_card` (validated) and written by
:func:`write_model_card` (atomically, NaN as null); nothing else parses or writes it.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hipoa.calibration import Calibration
from hipoa.sites import PATCH_SIZE

log = logging.getLogger(__name__)

REQUIRED_MEMBERS = ("config.json", "model.weights.h5")
"""Members every ``.keras`` archive has."""

MAX_CONFIG_BYTES = 64 << 20
"""A U-Net's config.json is some 10-100 kB; refuse to inflate a larger one."""

DISALLOWED_CLASSES = frozenset({"Lambda", "__lambda__", "TFSMLayer"})
"""Classes that would run code (or load a TensorFlow graph) from the file."""

_INTERNAL_CLASSES = frozenset(
    {"__keras_tensor__", "__tensor__", "__numpy__", "__bytes__", "__typespec__", "__slice__", "__ellipsis__", "__tuple__"}
)
"""Keras's serialisation markers for values (tensors, arrays, slices), which name no class."""

_FUNCTION_CLASSES = frozenset({"function", "__function__"})


class ModelError(ValueError):
    """A model file or model card that cannot be used (the message names the file and the problem)."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ---- model card ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PresenceRule:
    """How a probability map becomes a presence call (chosen on the validation split).

    Attributes:
        pixel_threshold: A pixel of a present osteophyte is in its mask when its class-1
            probability is >= this.
        min_area_px: An osteophyte is present when at least this many patch pixels reach
            ``detect_threshold``.
        detect_threshold: See ``min_area_px``; models trained before hipoa 0.2 have none, and
            then it equals ``pixel_threshold``.
    """

    pixel_threshold: float
    min_area_px: int
    detect_threshold: float | None = None

    @property
    def detect(self) -> float:
        return self.pixel_threshold if self.detect_threshold is None else self.detect_threshold

    def to_dict(self) -> dict[str, Any]:
        return {"pixel_threshold": self.pixel_threshold, "detect_threshold": self.detect,
                "min_area_px": self.min_area_px}


_RULE_KEYS = ("pixel_threshold", "detect_threshold", "min_area_px")


def model_json_path(model: str | Path) -> Path:
    """The model card beside a model: ``unet.json`` beside ``unet.keras`` (same stem)."""
    return Path(model).with_suffix(".json")


def _presence_rule(rule: Any, path: Path) -> PresenceRule:
    if not isinstance(rule, dict) or not {"pixel_threshold", "min_area_px"} <= set(rule):
        raise ModelError(f"{path}: expected a 'presence' entry with pixel_threshold and min_area_px, got {rule!r}")
    try:
        thr = float(rule["pixel_threshold"])
        min_px_value = float(rule["min_area_px"])
        detect = float(rule.get("detect_threshold") if rule.get("detect_threshold") is not None else thr)
    except (TypeError, ValueError):
        raise ModelError(f"{path}: presence values must be numbers, got {rule!r}") from None
    if not math.isfinite(min_px_value) or min_px_value != int(min_px_value):
        raise ModelError(f"{path}: presence.min_area_px must be a whole number, got {rule['min_area_px']!r}")
    min_px = int(min_px_value)
    if not 0.0 < thr <= 1.0:
        raise ModelError(f"{path}: presence.pixel_threshold must be in (0, 1], got {thr}")
    if not thr <= detect <= 1.0:
        raise ModelError(f"{path}: presence.detect_threshold must be in [pixel_threshold, 1] = [{thr}, 1], got {detect}")
    if min_px < 1:
        raise ModelError(f"{path}: presence.min_area_px must be >= 1, got {min_px}")
    return PresenceRule(pixel_threshold=thr, min_area_px=min_px, detect_threshold=detect)


def _calibration(info: dict[str, Any], path: Path) -> Calibration | None:
    """The calibration in a card's presence block (``presence.calibration``), or None when it has
    none (an older card) or says ``method: "none"``."""
    if info.get("calibration") is None:
        return None
    try:
        return Calibration.from_dict(info["calibration"])
    except ValueError as exc:
        raise ModelError(f"{path}: presence.calibration is invalid: {exc}") from None


_CARD_SECTIONS = ("site", "hipoa_version", "created", "settings", "architecture", "data", "training",
                  "validation", "presence", "loaded_from")
"""Top-level keys of ``unet.json`` that :class:`ModelCard` names, in the order they are written."""


@dataclass(frozen=True)
class ModelCard:
    """A site model's card, ``unet.json`` beside ``unet.keras`` (its JSON layout: :meth:`to_dict`).

    Attributes:
        presence: The presence rule. Given a dict (``choose_presence_rule``'s ``presence``),
            it is validated into a :class:`PresenceRule` and the dict's other keys
            (``prevalence``, ``prevalence_source``, ``prevalence_estimate``, ``candidates``,
            ``rule``, ``calibration``) go to ``presence_info``.
        site: Site key; ``hipoa_version``, ``created`` (ISO 8601 UTC) of the training run.
        settings: Training settings (epochs, batch size, U-Net size, augmentation, seed, policy, ...).
        architecture: U-Net size, classes, parameter count, saved policy.
        data: Stores, split table, context size, ``counts`` per split, samples per epoch.
        training: Epochs run, best epoch and validation loss, seconds, patches per second.
        validation: Validation scores at the presence rule.
        presence_info: How the rule was chosen (written inside ``presence``), and its
            ``calibration`` (the JSON of :class:`hipoa.calibration.Calibration`), if any.
        loaded_from: The model this one was copied from (``train-unet --load``), else None.
        extra: Any other top-level keys of the JSON, kept as they are.

    ``None`` (or empty ``extra``/``presence_info``) sections are not written. ``card["presence"]``
    and the like read the JSON layout, for code written against the dict. :attr:`calibration`
    is ``presence_info["calibration"]`` parsed (None: the score is uncalibrated).
    """

    presence: PresenceRule
    site: str | None = None
    hipoa_version: str | None = None
    created: str | None = None
    settings: dict[str, Any] | None = None
    architecture: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None
    presence_info: dict[str, Any] = field(default_factory=dict)
    loaded_from: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.presence, dict):
            rule = _presence_rule(self.presence, Path("model card"))
            info = {k: v for k, v in self.presence.items() if k not in _RULE_KEYS}
            object.__setattr__(self, "presence", rule)
            object.__setattr__(self, "presence_info", {**info, **self.presence_info})
        elif not isinstance(self.presence, PresenceRule):
            raise ModelError(f"model card: presence must be a PresenceRule or a dict, got {self.presence!r}")
        object.__setattr__(self, "calibration", _calibration(self.presence_info, Path("model card")))

    @classmethod
    def from_dict(cls, card: Any, path: str | Path = "model card") -> ModelCard:
        """The card of a parsed ``unet.json`` (``path`` names it in errors).

        Raises:
            ModelError: naming ``path`` when ``card`` is not an object, its presence rule is
                missing or invalid, or its ``presence.calibration`` is invalid.
        """
        path = Path(path)
        if not isinstance(card, dict):
            raise ModelError(f"{path}: model settings JSON must be an object, got {type(card).__name__}")
        rule = _presence_rule(card.get("presence"), path)
        info = {k: v for k, v in card["presence"].items() if k not in _RULE_KEYS}
        _calibration(info, path)  # a bad calibration names the card's path
        named = {k: card[k] for k in _CARD_SECTIONS if k in card and k != "presence"}
        return cls(
            presence=rule,
            presence_info=info,
            extra={k: v for k, v in card.items() if k not in _CARD_SECTIONS},
            **named,
        )

    def to_dict(self) -> dict[str, Any]:
        """The card in ``unet.json``'s layout (sections in :data:`_CARD_SECTIONS` order, then ``extra``)."""
        out: dict[str, Any] = {}
        for key in _CARD_SECTIONS:
            if key == "presence":
                out[key] = {**self.presence_info, **self.presence.to_dict()}
            elif getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(self.extra)
        return out

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]


def read_model_card(model: str | Path) -> ModelCard:
    """The model card (the JSON beside a ``.keras`` model), checked.

    Args:
        model: The ``.keras`` model; its card is :func:`model_json_path`.

    Returns:
        The :class:`ModelCard`; its ``presence`` is a valid :class:`PresenceRule` (a card written
        before hipoa 0.2, without ``detect_threshold``, reads as ``detect_threshold =
        pixel_threshold``).

    Raises:
        FileNotFoundError: naming the card when it is missing.
        ModelError: naming the card when it is not a regular file, not JSON, not an object, or
            its presence rule is missing or invalid.
    """
    model = Path(model)
    path = model_json_path(model)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model settings JSON not found (expected beside {model})")
    if not path.is_file():
        raise ModelError(f"{path}: model settings JSON is not a regular file")
    try:
        card = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise ModelError(f"{path}: model settings JSON is not text") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: model settings JSON is not valid JSON ({exc})") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the model settings JSON ({_one_line(exc)})") from None
    return ModelCard.from_dict(card, path)


def read_presence_rule(model: str | Path) -> PresenceRule:
    """The presence rule stored in the model card beside a ``.keras`` model.

    Raises:
        FileNotFoundError: naming the JSON when it is missing.
        ModelError: (a ValueError) naming the JSON and the value when the card or rule is invalid.
    """
    return read_model_card(model).presence


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None (JSON has no NaN: they are written as null), NumPy
    scalars as Python numbers and tuples as lists, recursively through dicts and lists."""
    import numpy as np

    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


def write_model(model, path: str | Path) -> None:
    """Write ``model`` (a ``keras.Model``) as a ``.keras`` file whose bytes depend on the model only.

    Keras writes the save date (``metadata.json: date_saved``) and file times into the zip, so
    two identical trainings would give different SHA-256s, and the phenotype tables record each
    model's SHA-256. The zip is rewritten without the date and with fixed member times.

    The file appears at ``path`` only when complete (:func:`hipoa.atomic.atomic_path`): Keras
    saves to ``{path}.tmp.keras``, the rewritten zip goes to ``{path}.tmp`` and is renamed.
    """
    from hipoa.atomic import atomic_path, remove_path, tmp_path_for

    path = Path(path)
    raw = tmp_path_for(path, ".keras")  # Keras saves only to *.keras
    with atomic_path(path) as tmp:
        remove_path(raw)
        try:
            model.save(raw)
            with zipfile.ZipFile(raw) as z:
                members = [(info.filename, z.read(info)) for info in z.infolist()]
        finally:
            remove_path(raw)
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in members:
                if name == "metadata.json":
                    meta = json.loads(data)
                    meta.pop("date_saved", None)
                    data = json.dumps(meta, sort_keys=True).encode()
                z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)


def write_model_card(model: str | Path, card: ModelCard | dict[str, Any]) -> Path:
    """Write the model card beside ``model`` (``unet.json`` beside ``unet.keras``), atomically.

    Args:
        model: The ``.keras`` model the card describes (it need not exist yet).
        card: A :class:`ModelCard`, or a dict in the card's JSON layout (validated as
            :func:`read_model_card` does).

    Returns:
        The card's path. NaN is written as null (:func:`json_safe`); the file appears complete or
        not at all (:mod:`hipoa.atomic`).

    Raises:
        ModelError: naming the card's path when a dict's presence rule is missing or invalid.
    """
    from hipoa.atomic import atomic_path

    path = model_json_path(model)
    if not isinstance(card, ModelCard):
        card = ModelCard.from_dict(card, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(card.to_dict()), indent=2) + "\n")
    return path


def install_model(src: str | Path, out: str | Path) -> ModelCard:
    """Use an existing model instead of training (``train-unet --load``): check it, copy it and its card.

    The card is read and the model loaded (:func:`load_model`: the file checked, safe mode, the
    shapes) before anything is written; then the model, its card (with ``loaded_from``) and its
    ``history.csv`` (an empty one when the source has none) are written beside ``out``, each
    complete or not at all.

    Args:
        src: An existing ``.keras`` U-Net with its ``.json`` card (same stem) beside it.
        out: Where the workflow expects the model (``results/models/{site}/unet.keras``).

    Returns:
        The card written (``loaded_from`` = ``str(src)``).

    Raises:
        FileNotFoundError: naming the missing model or card.
        ModelError: (a ValueError) naming the file: not a loadable, safe ``.keras`` U-Net, not
            128x128 -> 128x128xk, or its card is invalid or lacks the presence rule.
    """
    import shutil

    from hipoa.atomic import atomic_path

    src, out = Path(src), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"model to load not found: {src}")
    info_path = model_json_path(src)
    if not info_path.exists():
        raise FileNotFoundError(f"{src}: its settings file {info_path} is missing (it holds the presence rule)")
    card = read_model_card(src)
    load_model(src)  # checks the file, then that Keras loads it and its shapes
    out.parent.mkdir(parents=True, exist_ok=True)
    if src.resolve() != out.resolve():
        with atomic_path(out) as tmp:
            shutil.copyfile(src, tmp)
    card = replace(card, loaded_from=str(src))
    write_model_card(out, card)
    hist_src, hist_out = src.parent / "history.csv", out.parent / "history.csv"
    if hist_src.is_file():
        if hist_src.resolve() != hist_out.resolve():
            with atomic_path(hist_out) as tmp:
                shutil.copyfile(hist_src, tmp)
    else:
        with atomic_path(hist_out) as tmp:
            tmp.write_text("epoch,loss,val_loss,seconds\n")
    log.info("loaded %s (min_area_px %s) -> %s", src, card.presence.min_area_px, out)
    return card


# ---- model file ---------------------------------------------------------------------------------


def _is_keras_module(module: Any) -> bool:
    return isinstance(module, str) and (module == "keras" or module.startswith("keras."))


def _resolve(module: str, name: str) -> Any:
    """``module.name`` for a Keras module, or None (importing only Keras's own modules)."""
    try:
        return getattr(importlib.import_module(module), name, None)
    except Exception:  # noqa: BLE001 - an unknown keras.* module is an unknown class
        return None


def _registered(name: str) -> Any:
    import keras

    try:
        return keras.saving.get_registered_object(name)
    except Exception:  # noqa: BLE001
        return None


def _check_object(obj: dict[str, Any], path: Path, where: str) -> None:
    """Check one serialised Keras object (a dict with ``class_name``) of ``config.json``."""
    cls = obj.get("class_name")
    module = obj.get("module")
    registered = obj.get("registered_name")
    if not isinstance(cls, str):
        raise ModelError(f"{path}: config.json: class_name at {where} is not a string: {cls!r}")
    if cls in DISALLOWED_CLASSES:
        raise ModelError(f"{path}: config.json uses disallowed class {cls!r} at {where} (it would run code from the file)")
    if "module" in obj and module is not None and not _is_keras_module(module):
        raise ModelError(
            f"{path}: config.json names disallowed module {module!r} (class {cls!r}) at {where}; "
            "only Keras's own classes are loaded"
        )
    if cls in _INTERNAL_CLASSES:
        return
    if cls in _FUNCTION_CLASSES:
        # Keras's own functions (e.g. a loss by name) are fine; anything else would be code.
        fn = obj.get("config")
        if not (_is_keras_module(module) and isinstance(fn, str) and callable(_resolve(module, fn))):
            raise ModelError(f"{path}: config.json has a disallowed function entry {fn!r} (module {module!r}) at {where}")
        return
    if registered is not None and not isinstance(registered, str):
        raise ModelError(f"{path}: config.json: registered_name at {where} is not a string: {registered!r}")
    if module is not None:
        if _resolve(module, cls) is None and (registered is None or _registered(registered) is None):
            raise ModelError(f"{path}: config.json names unknown class {module}.{cls} at {where}")
    elif _registered(registered or cls) is None:
        raise ModelError(f"{path}: config.json names unknown class {registered or cls!r} (no module) at {where}")
    if registered is not None and registered != cls and _registered(registered) is None:
        raise ModelError(f"{path}: config.json names unknown class {registered!r} (registered_name) at {where}")


def _walk(node: Any, path: Path, where: str) -> None:
    if isinstance(node, dict):
        if "class_name" in node:
            _check_object(node, path, where)
        elif "module" in node and not _is_keras_module(node["module"]):
            raise ModelError(f"{path}: config.json names disallowed module {node['module']!r} at {where}")
        for key, value in node.items():
            _walk(value, path, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _walk(value, path, f"{where}[{i}]")


def check_model_file(path: str | Path) -> dict[str, Any]:
    """Check a ``.keras`` file before Keras reads it (see the module docstring).

    Args:
        path: The ``.keras`` model.

    Returns:
        Its parsed ``config.json``.

    Raises:
        FileNotFoundError: naming the file when it does not exist.
        ModelError: naming the file and the problem: not a regular file, not a zip (truncated?),
            a corrupt member, a missing member, config.json not JSON, or a disallowed or unknown
            class in it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model not found")
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a FIFO, socket or device?)"
        raise ModelError(f"{path}: model is {kind}, expected a .keras file")
    try:
        if not zipfile.is_zipfile(path):
            raise ModelError(
                f"{path}: not a .keras model: not a zip archive (truncated or not a .keras file?), "
                f"{path.stat().st_size} bytes"
            )
        with zipfile.ZipFile(path) as z:
            try:
                bad = z.testzip()
            except Exception as exc:  # noqa: BLE001 - zlib.error, EOFError, BadZipFile, ...
                raise ModelError(f"{path}: model file is truncated or corrupt ({_one_line(exc)})") from None
            if bad is not None:
                raise ModelError(f"{path}: model file is truncated or corrupt (member {bad} fails its CRC check)")
            names = set(z.namelist())
            missing = [m for m in REQUIRED_MEMBERS if m not in names]
            if missing:
                raise ModelError(f"{path}: not a .keras model: the archive lacks {', '.join(missing)}")
            info = z.getinfo("config.json")
            if info.file_size > MAX_CONFIG_BYTES:
                raise ModelError(f"{path}: config.json is {info.file_size} bytes, more than a model's config")
            raw = z.read(info)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelError(f"{path}: model file is truncated or corrupt ({_one_line(exc)})") from None
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: config.json is not valid JSON ({_one_line(exc)})") from None
    if not isinstance(config, dict) or "class_name" not in config:
        raise ModelError(f"{path}: config.json is not a serialised Keras model")
    _walk(config, path, "config")
    return config


def load_model(path: str | Path, policy: str = "float32"):
    """Load a site's ``.keras`` U-Net, checked, for inference under the Keras dtype ``policy``.

    Args:
        path: The ``.keras`` model.
        policy: A Keras dtype policy (:data:`hipoa.precision.POLICIES`); ``"float32"`` keeps
            the model as saved.

    Returns:
        The ``keras.Model`` (uncompiled).

    Raises:
        FileNotFoundError: naming the file when it does not exist.
        ModelError: (a ValueError) with a one-line message naming the file: see
            :func:`check_model_file`; Keras failed to load it; or the shapes are not input
            ``(128, 128, 1)`` and output ``(128, 128, k)``.
    """
    import keras

    from hipoa.precision import with_policy

    path = Path(path)
    check_model_file(path)
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - whatever Keras raises, one line naming the file
        raise ModelError(f"{path}: Keras could not load the model: {type(exc).__name__}: {_one_line(exc)}") from None
    size = (PATCH_SIZE, PATCH_SIZE)
    try:
        shape_in, shape_out = tuple(model.input_shape[1:]), tuple(model.output_shape[1:])
    except Exception as exc:  # noqa: BLE001 - multi-input models have no single shape
        raise ModelError(f"{path}: expected a single-input, single-output U-Net ({_one_line(exc)})") from None
    if shape_in != (*size, 1) or len(shape_out) != 3 or shape_out[:2] != size:
        raise ModelError(
            f"{path}: expected input (128, 128, 1) and output (128, 128, k), "
            f"got {model.input_shape} -> {model.output_shape}"
        )
    if policy != "float32":
        try:
            model = with_policy(model, policy)
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"{path}: cannot run the model under {policy}: {_one_line(exc)}") from None
    return model
