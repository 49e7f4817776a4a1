"""increc: TF-Serving-compatible serving, model config and clients."""
import os

# TFRS needs Keras 2; this must be set before TensorFlow is first imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
