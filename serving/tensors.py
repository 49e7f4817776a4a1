"""TensorProto <-> numpy on the request path, reading the proto's buffers directly.

A request's tensors are checked on arrival (`inspect`: shape, dtype, value
count, size) but decoded once per batch (`concat`): the `tensor_content` of
all requests joined into one np.frombuffer, typed `*_val` fields into one
np.array call, DT_STRING values into one object array of bytes.
`tf.make_ndarray` is only the fallback for rare dtypes.
Outputs are written to the typed `*_val` fields, as TF Serving does by
default. Malformed tensors are INVALID_ARGUMENT `tensor parsing error: x`,
TF Serving's text; a tensor whose decoded size would exceed the request
limit (a tiny proto can claim a huge shape) is refused the same way.
"""
from __future__ import annotations

import math

import numpy as np
from tensorflow.core.framework import types_pb2

from serving.errors import invalid

STRING = types_pb2.DT_STRING
# dtype enum -> (numpy dtype, typed field, numpy dtype the field's values parse as)
FIELDS = {
    types_pb2.DT_FLOAT: (np.float32, "float_val", np.float32),
    types_pb2.DT_DOUBLE: (np.float64, "double_val", np.float64),
    types_pb2.DT_INT32: (np.int32, "int_val", np.int64),
    types_pb2.DT_INT16: (np.int16, "int_val", np.int64),
    types_pb2.DT_INT8: (np.int8, "int_val", np.int64),
    types_pb2.DT_UINT8: (np.uint8, "int_val", np.int64),
    types_pb2.DT_UINT16: (np.uint16, "int_val", np.int64),
    types_pb2.DT_INT64: (np.int64, "int64_val", np.int64),
    types_pb2.DT_UINT32: (np.uint32, "uint32_val", np.uint64),
    types_pb2.DT_UINT64: (np.uint64, "uint64_val", np.uint64),
    types_pb2.DT_BOOL: (np.bool_, "bool_val", np.bool_),
    types_pb2.DT_HALF: (np.float16, "half_val", np.int64),  # half_val holds the 16 bits
}
NUMPY_TO_ENUM = {np.dtype(v[0]): k for k, v in FIELDS.items()}


def dtype_name(enum: int) -> str:
    """TF's short name of a dtype enum (`float`, `int64`, `string`), as its error texts use."""
    name = types_pb2.DataType.Name(enum) if enum in types_pb2.DataType.values() else str(enum)
    return name[3:].lower() if name.startswith("DT_") else name


def inspect(alias: str, proto, max_bytes: int):
    """(dims, numpy dtype string or None) of a request TensorProto, checked the way to_array would check it,
    without decoding its values (that happens once per batch, in the batch thread)."""
    dims = [d.size for d in proto.tensor_shape.dim]
    if proto.tensor_shape.unknown_rank or any(d < 0 for d in dims):
        raise invalid(f"tensor parsing error: {alias}")
    size = math.prod(dims)
    dtype = proto.dtype
    if dtype == STRING:
        if size * 8 > max_bytes:
            raise _too_big(alias, dims, size * 8, max_bytes)
        if len(proto.string_val) > size:
            raise invalid(f"tensor parsing error: {alias}")
        return dims, "|O"
    entry = FIELDS.get(dtype)
    if entry is None:
        return dims, None
    itemsize = np.dtype(entry[0]).itemsize
    if size * itemsize > max_bytes:
        raise _too_big(alias, dims, size * itemsize, max_bytes)
    content = proto.tensor_content
    if (len(content) != size * itemsize) if content else (len(getattr(proto, entry[1])) > size):
        raise invalid(f"tensor parsing error: {alias}")
    return dims, np.dtype(entry[0]).str


def concat(alias: str, sources: list, max_bytes: int) -> np.ndarray:
    """The batch of several requests' values for one input, stacked along the first dimension.

    `sources` are (array or TensorProto, dims). Protos that hold exactly
    their values are joined before decoding (one frombuffer, one np.array or
    one object array for the whole batch); anything else is decoded alone.
    """
    tail = list(sources[0][1][1:])
    if not any(isinstance(source, np.ndarray) for source, _ in sources):
        dtype = sources[0][0].dtype
        entry = FIELDS.get(dtype)
        if dtype == STRING:
            values = []
            for proto, dims in sources:
                if len(proto.string_val) != math.prod(dims):
                    break
                values.extend(proto.string_val)
            else:
                array = np.empty(len(values), dtype=object)
                array[:] = values
                return array.reshape([-1] + tail)
        elif entry is not None and dtype != types_pb2.DT_HALF:
            np_dtype, field, parsed_as = entry
            if all(proto.tensor_content for proto, _ in sources):
                return np.frombuffer(b"".join(proto.tensor_content for proto, _ in sources),
                                     dtype=np_dtype).reshape([-1] + tail)
            if parsed_as is np_dtype and not any(proto.tensor_content for proto, _ in sources):
                values = []
                for proto, dims in sources:
                    field_values = getattr(proto, field)
                    if len(field_values) != math.prod(dims):
                        break
                    values.extend(field_values)
                else:
                    return np.array(values, dtype=np_dtype).reshape([-1] + tail)
    return np.concatenate([source if isinstance(source, np.ndarray) else to_array(alias, source, max_bytes)
                           for source, _ in sources])


def to_array(alias: str, proto, max_bytes: int) -> np.ndarray:
    """The value of a request TensorProto as a numpy array (object array of bytes for DT_STRING)."""
    dims = [d.size for d in proto.tensor_shape.dim]
    if proto.tensor_shape.unknown_rank or any(d < 0 for d in dims):
        raise invalid(f"tensor parsing error: {alias}")
    size = math.prod(dims)
    dtype = proto.dtype
    if dtype == STRING:
        values = proto.string_val
        if size * 8 > max_bytes:
            raise _too_big(alias, dims, size * 8, max_bytes)
        if len(values) == size:
            array = np.empty(size, dtype=object)
            array[:] = values
            return array.reshape(dims)
        return _filled(alias, list(values), dims, size, object)
    entry = FIELDS.get(dtype)
    if entry is None:
        return _fallback(alias, proto, size, max_bytes)
    np_dtype, field, parsed_as = entry
    if size * np.dtype(np_dtype).itemsize > max_bytes:
        raise _too_big(alias, dims, size * np.dtype(np_dtype).itemsize, max_bytes)
    content = proto.tensor_content
    if content:
        if len(content) != size * np.dtype(np_dtype).itemsize:
            raise invalid(f"tensor parsing error: {alias}")
        return np.frombuffer(content, dtype=np_dtype).reshape(dims)
    values = getattr(proto, field)
    if dtype == types_pb2.DT_HALF:
        bits = np.array(values, dtype=np.int64).astype(np.uint16)
        return _filled(alias, bits, dims, size, np.uint16).view(np.float16)
    if parsed_as is np_dtype:
        array = np.array(values, dtype=np_dtype)
    else:  # narrow ints travel in int_val; wrap like TF's static_cast
        array = np.array(values, dtype=parsed_as).astype(np_dtype)
    if array.size == size:
        return array.reshape(dims)
    return _filled(alias, array, dims, size, np_dtype)


def _filled(alias, values, dims, size, np_dtype) -> np.ndarray:
    """TF's rule for short value lists: the last value repeats; no value means zeros."""
    n = len(values)
    if n > size:
        raise invalid(f"tensor parsing error: {alias}")
    array = np.empty(size, dtype=np_dtype) if np_dtype is object else np.zeros(size, dtype=np_dtype)
    if np_dtype is object and n == 0:
        array[:] = b""
    elif n:
        array[:n] = values
        array[n:] = values[n - 1]
    return array.reshape(dims)


def _fallback(alias, proto, size, max_bytes) -> np.ndarray:
    import tensorflow as tf

    try:
        itemsize = tf.as_dtype(proto.dtype).size
    except (TypeError, ValueError):
        raise invalid(f"tensor parsing error: {alias}") from None
    if size * max(itemsize, 1) > max_bytes:
        raise _too_big(alias, [d.size for d in proto.tensor_shape.dim], size * itemsize, max_bytes)
    try:
        return tf.make_ndarray(proto)
    except Exception:  # noqa: BLE001 - any malformed proto is the client's error
        raise invalid(f"tensor parsing error: {alias}") from None


def _too_big(alias, dims, need, limit):
    return invalid(f"tensor parsing error: {alias}: shape {dims} needs {need} bytes, more than the request "
                   f"limit of {limit} bytes")


def fill_proto(proto, array: np.ndarray) -> None:
    """Writes an output array into an empty TensorProto's dtype, shape and typed `*_val` field."""
    array = np.asarray(array)
    shape = proto.tensor_shape
    for size in array.shape:
        shape.dim.add().size = size
    if array.dtype == object or array.dtype.kind in "SU":
        proto.dtype = STRING
        proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode() for v in array.ravel().tolist())
        return
    enum = NUMPY_TO_ENUM.get(array.dtype)
    if enum is None:
        import tensorflow as tf

        proto.Clear()
        proto.CopyFrom(tf.make_tensor_proto(array))
        return
    proto.dtype = enum
    if enum == types_pb2.DT_HALF:
        proto.half_val.extend(array.ravel().view(np.uint16).tolist())
        return
    getattr(proto, FIELDS[enum][1]).extend(array.ravel().tolist())
