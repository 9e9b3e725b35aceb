# The config as the rules see it: command-line values coerced to the schema's types, then
# validated (which also fills in the schema's defaults). Included by the Snakefile before any
# other rule file; config/README.md says where each value comes from.

import math
from pathlib import Path

import jsonschema
import yaml

CONFIG_SCHEMA = Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"
# How to give nested keys on the command line, for errors about values that look typed there.
CONFIG_HINT = (
    "On the command line give a section as a YAML mapping, e.g. "
    "--config 'training={epochs: 20}' 'sides=[L, R]'; its values are converted to the "
    "schema's types (numbers, booleans)"
)
TRUE_WORDS = {
    "true": True,
    "yes": True,
    "on": True,
    "false": False,
    "no": False,
    "off": False,
}


def schema_node(schema, node):
    """``node`` with a local ``$ref`` (#/$defs/NAME) replaced by its target."""
    ref = node.get("$ref", "")
    if ref.startswith("#/$defs/"):
        return schema["$defs"][ref.removeprefix("#/$defs/")]
    return node


def coerce_scalar(value, node):
    """``value`` as the type ``node`` asks for, when it is text that reads as that type.

    Snakemake reads the values inside a `--config key={...}` mapping as text ("3", "true");
    a value that does not read as the type is returned unchanged for validation to report.
    """
    if not isinstance(value, str):
        return value
    types = [node.get("type")] + [
        option.get("type") for option in node.get("oneOf", [])
    ]
    if value in node.get("enum", []) or any(
        value in option.get("enum", []) for option in node.get("oneOf", [])
    ):
        return value
    text = value.strip()
    if "integer" in types:
        try:
            return int(text)
        except ValueError:
            pass
    if "number" in types:
        try:
            number = float(text)
        except ValueError:
            pass
        else:
            # nan and inf would pass every bound (comparisons with nan are false): left as text,
            # for validation to refuse.
            if math.isfinite(number):
                return (
                    int(number) if number.is_integer() and "." not in text else number
                )
    if "boolean" in types and text.lower() in TRUE_WORDS:
        return TRUE_WORDS[text.lower()]
    if "array" in types and text.startswith("["):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            pass
    return value


def coerce_config(value, node, schema):
    """A copy of ``value`` with text converted to the types of ``node`` (a schema), recursively."""
    node = schema_node(schema, node)
    value = coerce_scalar(value, node)
    if isinstance(value, dict) and node.get("type") == "object":
        properties = node.get("properties", {})
        extra = node.get("additionalProperties")
        return {
            key: coerce_config(
                item,
                properties.get(key, extra if isinstance(extra, dict) else {}),
                schema,
            )
            for key, item in value.items()
        }
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [coerce_config(item, node["items"], schema) for item in value]
    return value


def config_error(error, command_line):
    """One line for a schema violation: the key path, the value and what the schema expected,
    with how to give values on the command line when the key came from `--config`."""
    parts = list(error.absolute_path)
    path = ".".join(str(part) for part in parts) or "(top level)"
    if error.validator == "additionalProperties":
        return f"config {path}: {error.message}; see config/README.md for the keys"
    if parts and parts[0] in command_line:
        return f"config {path}: {error.message}. {CONFIG_HINT}"
    return f"config {path}: {error.message} (config/README.md describes the key)"


def load_config(config, schema_path):
    """Coerce ``config`` in place, refuse it with one line per first error, fill the defaults."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    coerced = coerce_config(dict(config), schema, schema)
    config.clear()
    config.update(coerced)
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(config)
    )
    if error is not None:
        raise ValueError(config_error(error, dict(workflow.config_settings.config)))
    validate(config, str(schema_path))


load_config(config, CONFIG_SCHEMA)
