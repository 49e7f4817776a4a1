"""increc: pipeline assembly, config, runners and the CLI."""
import os

# TFRS needs Keras 2; this must be set before TensorFlow is first imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
