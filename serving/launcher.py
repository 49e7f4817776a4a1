"""`increc serve --backend tfserving`: run a real tensorflow_model_server with the same flags."""
from __future__ import annotations

import os
import shutil
import sys

from serving import flags as flags_lib

BINARY = "tensorflow_model_server"


def command(flags: flags_lib.Flags) -> list:
    binary = shutil.which(BINARY)
    if binary is None:
        raise FileNotFoundError(f"{BINARY} is not on PATH; install TensorFlow Serving, run its docker image "
                                f"(see the README), or use the embedded server (--backend embedded)")
    return [binary] + flags_lib.to_argv(flags)


def exec_real_server(flags: flags_lib.Flags) -> int:
    try:
        argv = command(flags)
    except FileNotFoundError as e:
        print(f"increc serve: {e}", file=sys.stderr)
        return 2
    if flags.host not in ("127.0.0.1", "0.0.0.0"):
        print("increc serve: note: the real server binds every interface; --host does not apply to it",
              file=sys.stderr)
    os.execv(argv[0], argv)
    return 0
