"""tensorflow_model_server's command-line flags, with the same names, forms and defaults.

Accepts `--flag=value`, `--flag value` and bare booleans (`--flag`,
`--flag=true|false`), so a command line written for the real binary starts
this server unchanged. Other real-server flags are accepted and ignored with
a warning. increc adds `--host`, `--max_request_bytes` and `--backend`.
One default differs on purpose: `--enable_batching` is on, because merging
concurrent requests is what makes a Python server keep up (README, Serving);
`--enable_batching=false` turns it off, and `to_argv` always spells it out
for the real binary, whose default is off.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import List

# The real server's flags this server does not act on; accepted so command lines keep working.
IGNORED = {
    "grpc_socket_path", "rest_api_num_threads", "tensorflow_session_parallelism",
    "tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism", "per_process_gpu_memory_fraction",
    "saved_model_tags", "grpc_channel_arguments", "enable_model_warmup_with_inference_on_load",
    "platform_config_file", "ssl_config_file", "model_config_file_poll_wait_seconds_for_retries",
    "flush_filesystem_caches", "num_load_threads", "num_unload_threads", "xla_cpu_compilation_enabled",
    "enable_serialization_as_tensor_content", "remove_unused_fields_from_bundle_metagraph",
    "prefer_tflite_model", "use_tflite_model", "mixed_precision", "thread_pool_factory_config_file",
    "grpc_max_threads", "servable_versions_always_present", "tfrt_use_fused_gpu_op", "use_tfrt",
}


@dataclasses.dataclass
class Flags:
    port: int = 8500
    rest_api_port: int = 0
    rest_api_timeout_in_ms: int = 30000
    rest_api_enable_cors_support: bool = False
    model_name: str = "default"
    model_base_path: str = ""
    model_config_file: str = ""
    model_config_file_poll_wait_seconds: int = 0
    file_system_poll_wait_seconds: int = 1
    monitoring_config_file: str = ""
    allow_version_labels_for_unavailable_models: bool = False
    enable_batching: bool = True  # TF Serving's default is false; see the module docstring
    batching_parameters_file: str = ""
    enable_model_warmup: bool = True
    enable_signature_method_name_check: bool = False
    max_num_load_retries: int = 5
    load_retry_interval_micros: int = 60_000_000
    # increc's own
    host: str = "127.0.0.1"
    max_request_bytes: int = 64 << 20
    backend: str = "embedded"


class FlagError(ValueError):
    pass


def _parse_bool(name: str, text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise FlagError(f"--{name}: expected true or false, got {text!r}")


def parse(argv: List[str]) -> Flags:
    flags = Flags()
    fields = {f.name: f for f in dataclasses.fields(Flags)}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help", "--helpfull"):
            raise FlagError(usage())
        if not arg.startswith("-"):
            raise FlagError(f"unexpected argument {arg!r}")
        body = arg.lstrip("-")
        name, has_value, value = body.partition("=")
        name = name.replace("-", "_")
        if name.startswith("no") and name[2:] in fields and fields[name[2:]].type in (bool, "bool") and not has_value:
            setattr(flags, name[2:], False)
            continue
        if name in IGNORED:
            if not has_value and i < len(argv) and not argv[i].startswith("--"):
                i += 1
            logging.warning("--%s is accepted for compatibility and ignored by the embedded server", name)
            continue
        if name not in fields:
            raise FlagError(f"unknown flag --{name}\n{usage()}")
        kind = fields[name].type
        if kind in (bool, "bool"):
            if has_value:
                setattr(flags, name, _parse_bool(name, value))
            elif i < len(argv) and argv[i].lower() in ("true", "false"):
                setattr(flags, name, _parse_bool(name, argv[i]))
                i += 1
            else:
                setattr(flags, name, True)
            continue
        if not has_value:
            if i >= len(argv):
                raise FlagError(f"--{name} needs a value")
            value = argv[i]
            i += 1
        if kind in (int, "int"):
            try:
                setattr(flags, name, int(value))
            except ValueError:
                raise FlagError(f"--{name}: expected an integer, got {value!r}") from None
        else:
            setattr(flags, name, value)
    if flags.backend not in ("embedded", "tfserving"):
        raise FlagError("--backend must be embedded or tfserving")
    if flags.model_config_file and flags.model_base_path:
        raise FlagError("give --model_config_file or --model_base_path, not both")
    if not flags.model_config_file and not flags.model_base_path:
        raise FlagError("one of --model_config_file or --model_base_path is required")
    return flags


def usage() -> str:
    names = [f"--{f.name} (default {f.default!r})" for f in dataclasses.fields(Flags)]
    return "usage: increc serve [flags]\n  " + "\n  ".join(names)


# Where this server's default differs from tensorflow_model_server's, the real one's.
REAL_DEFAULTS = {"enable_batching": False}


def to_argv(flags: Flags, only_real: bool = True) -> List[str]:
    """The command line for a real tensorflow_model_server with the same meaning."""
    out = []
    defaults = Flags()
    for field in dataclasses.fields(Flags):
        if only_real and field.name in ("host", "max_request_bytes", "backend"):
            continue
        value = getattr(flags, field.name)
        default = REAL_DEFAULTS.get(field.name, getattr(defaults, field.name)) if only_real else \
            getattr(defaults, field.name)
        if value == default and field.name not in ("port",):
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        out.append(f"--{field.name}={value}")
    return out
