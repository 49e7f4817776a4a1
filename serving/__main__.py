"""`python -m serving [tensorflow_model_server flags]` runs the embedded server."""
import sys

from serving.server import main

sys.exit(main())
