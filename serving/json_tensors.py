"""TF Serving's REST JSON (util/json_tensor.cc): request bodies to arrays and Examples, outputs to JSON text.

Parsing follows rapidjson with kParseNanAndInfFlag as TF Serving uses it:
NaN/Infinity are accepted, bytes after the top-level value are ignored,
strings keep their bytes even when they are not valid UTF-8, integers too
big for 64 bits become doubles and a number too big for a double is a parse
error. Nesting too deep for the parser is a 400 parse error, never a crash.
Type rules, shape rules and error texts are json_tensor.cc's.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
from tensorflow.core.framework import types_pb2

from serving.errors import ServingError, invalid, unimplemented
from serving.tensors import dtype_name

MAX_RANK = 32  # numpy's limit on dimensions
MAX_VALUE_TEXT = 1000  # error texts quote request values; a huge document is cut here
FLOAT32_MAX = float(np.finfo(np.float32).max)


class _NumberTooBig(ValueError):
    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _NumberTooBig(text)
    return value


def _parse_int(text: str):
    if len(text) < 19:
        return int(text)
    value = float(text) if len(text) > 30 else int(text)
    if isinstance(value, int) and -2 ** 63 <= value < 2 ** 64:
        return value
    value = float(text)  # rapidjson keeps integers past 64 bits as doubles
    if math.isinf(value):
        raise _NumberTooBig(text)
    return value


_DECODER = json.JSONDecoder(parse_float=_parse_float, parse_int=_parse_int)
# Python's json messages -> rapidjson's (GetParseError_En)
_MESSAGES = {
    "Expecting value": "Invalid value.",
    "Expecting property name enclosed in double quotes": "Missing a name for object member.",
    "Expecting ':' delimiter": "Missing a colon after a name of object member.",
    "Unterminated string starting at": "Missing a closing quotation mark in string.",
    "Invalid control character at": "Invalid encoding in string.",
    "Invalid \\escape": "Invalid escape character in string.",
    "Invalid \\uXXXX escape": "Incorrect hex digit after \\u escape in string.",
}


def _open_container(text: str, end: int) -> str:
    """'{' or '[': the innermost container still open at `end` (for rapidjson's comma messages)."""
    stack, in_string, escaped = [], False, False
    for ch in text[:end]:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            stack.append(ch)
        elif ch in "]}" and stack:
            stack.pop()
    return stack[-1] if stack else "["


def _too_deep_offset(text: str, limit: int) -> int:
    depth, in_string, escaped = 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return i
        elif ch in "]}":
            depth -= 1
    return 0


def parse_json(body: bytes) -> dict:
    """The request's top-level JSON object, or INVALID_ARGUMENT with TF Serving's texts."""
    if not body:
        raise invalid("JSON Parse error: The document is empty")
    text = body.decode("utf-8", "surrogateescape")
    start = len(text) - len(text.lstrip(" \t\n\r"))
    if start == len(text):
        raise invalid(f"JSON Parse error: The document is empty. at offset: {start}")
    try:
        value, _ = _DECODER.raw_decode(text, start)  # what follows the value is ignored, as rapidjson does here
    except json.JSONDecodeError as e:
        message = _MESSAGES.get(e.msg)
        if message is None and e.msg.startswith("Expecting ',' delimiter"):
            message = ("Missing a comma or '}' after an object member." if _open_container(text, e.pos) == "{"
                       else "Missing a comma or ']' after an array element.")
        raise invalid(f"JSON Parse error: {message or 'Invalid value.'} at offset: {e.pos}") from None
    except _NumberTooBig as e:
        raise invalid(f"JSON Parse error: Number too big to be stored in double. at offset: "
                      f"{max(text.find(e.text, start), start)}") from None
    except RecursionError:
        depth = _depth_limit()
        raise invalid(f"JSON Parse error: Nesting deeper than {depth} levels. at offset: "
                      f"{_too_deep_offset(text, depth)}") from None
    if not isinstance(value, dict):
        raise invalid(f"JSON Value: {value_text(value)} Is not object")
    return value


def _depth_limit() -> int:
    import sys

    return max(1, sys.getrecursionlimit() - 100)


# --- JSON values in error texts ---

def json_type(value) -> str:
    """rapidjson's type names, as TF Serving's errors print them."""
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, (int, float)):
        return "Number"
    if isinstance(value, str):
        return "String"
    if isinstance(value, list):
        return "Array"
    return "Object"


def value_text(value) -> str:
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (ValueError, RecursionError):
        text = "..."
    return text if len(text) <= MAX_VALUE_TEXT else text[:MAX_VALUE_TEXT] + "..."


def _type_error(value, dtype: int) -> ServingError:
    return invalid(f"JSON Value: {value_text(value)} Type: {json_type(value)} is not of expected type: "
                   f"{dtype_name(dtype)}")


def _lossy(value, target: str) -> ServingError:
    return invalid(f"Cannot convert JSON value: {value_text(value)} to {target} without loss of precision.")


# --- JSON values -> tensor values (AddValueToTensor) ---

def _is_b64(value) -> bool:
    return type(value) is dict and len(value) == 1 and type(value.get("b64")) is str


def decode_b64(value) -> bytes:
    if not _is_b64(value):
        raise invalid(f"JSON Value: {value_text(value)} not formatted correctly for base64 data")
    text = value["b64"]
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise invalid("Unable to base64 decode") from None


def _float_converter(dtype: int, mantissa_bits: int, max_value: float) -> Callable:
    max_int = (1 << mantissa_bits) - 1
    target = dtype_name(dtype)

    def convert(value):
        kind = type(value)
        if kind is float:
            if math.isfinite(value) and not -max_value <= value <= max_value:
                raise _lossy(value, target)
            return value
        if kind is int:
            if abs(value) > max_int:
                raise _lossy(value, target)
            return value
        raise _type_error(value, dtype)
    return convert


def _int_converter(dtype: int, low: int, high: int) -> Callable:
    def convert(value):
        if type(value) is int and low <= value <= high:
            return value
        raise _type_error(value, dtype)
    return convert


def utf8(text: str) -> bytes:
    """A JSON string's bytes: invalid UTF-8 in the body comes back as it was sent."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a \u escape of half a surrogate pair, which rapidjson refuses
        raise invalid("JSON Parse error: The surrogate pair in string is invalid.") from None


def _bool(value):
    if type(value) is bool:
        return value
    raise _type_error(value, types_pb2.DT_BOOL)


def _string(value):
    if type(value) is str:
        return utf8(value)
    if type(value) is dict:
        return decode_b64(value)
    raise _type_error(value, types_pb2.DT_STRING)


_INT32 = (-2 ** 31, 2 ** 31 - 1)
CONVERTERS = {
    types_pb2.DT_FLOAT: (_float_converter(types_pb2.DT_FLOAT, 24, FLOAT32_MAX), np.float32),
    types_pb2.DT_DOUBLE: (_float_converter(types_pb2.DT_DOUBLE, 53, float("inf")), np.float64),
    types_pb2.DT_INT32: (_int_converter(types_pb2.DT_INT32, *_INT32), np.int32),
    types_pb2.DT_INT16: (_int_converter(types_pb2.DT_INT16, *_INT32), np.int16),
    types_pb2.DT_INT8: (_int_converter(types_pb2.DT_INT8, *_INT32), np.int8),
    types_pb2.DT_UINT8: (_int_converter(types_pb2.DT_UINT8, *_INT32), np.uint8),
    types_pb2.DT_INT64: (_int_converter(types_pb2.DT_INT64, -2 ** 63, 2 ** 63 - 1), np.int64),
    types_pb2.DT_UINT32: (_int_converter(types_pb2.DT_UINT32, 0, 2 ** 32 - 1), np.uint32),
    types_pb2.DT_UINT64: (_int_converter(types_pb2.DT_UINT64, 0, 2 ** 64 - 1), np.uint64),
    types_pb2.DT_BOOL: (_bool, np.bool_),
    types_pb2.DT_STRING: (_string, object),
}
_NARROW = {np.int16, np.int8, np.uint8}  # int values wrap into these like TF's static_cast


def _converter(dtype: int, value) -> Tuple[Callable, Any]:
    found = CONVERTERS.get(dtype)
    if found is None:
        raise unimplemented(f"Conversion of JSON Value: {value_text(value)} to type: {dtype_name(dtype)}")
    return found


def dense_shape(value) -> List[int]:
    """GetDenseTensorShape: the shape read along the first elements."""
    shape = []
    while type(value) is list:
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def fill_values(value, shape: List[int], dtype: int, out: list) -> None:
    """FillTensorProto: appends the leaf values, checking each list's level and size."""
    convert, _ = _converter(dtype, value)
    rank = len(shape)
    if rank == 0:
        if type(value) is dict and dtype != types_pb2.DT_STRING:
            raise _type_error(value, dtype)
        out.append(convert(value))
        return
    stack = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if type(item) is list:
            if level >= rank:
                raise invalid(f"Encountered list at unexpected level: {level} expected < {rank}")
            if len(item) != shape[level]:
                raise invalid(f"Encountered list at unexpected size: {len(item)} at level: {level} expected size: "
                              f"{shape[level]}")
            stack.extend((x, level + 1) for x in reversed(item))
            continue
        if level != rank:
            raise invalid(f"JSON Value: {value_text(item)} found at incorrect level: {level + 1} in the JSON DOM. "
                          f"Expected at level: {rank}")
        if type(item) is dict and dtype != types_pb2.DT_STRING:
            raise _type_error(item, dtype)
        out.append(convert(item))


def to_array(values: list, shape: List[int], dtype: int) -> np.ndarray:
    if len(shape) > MAX_RANK:
        raise invalid(f"Tensor of rank {len(shape)} is not supported; at most {MAX_RANK} dimensions")
    _, np_dtype = CONVERTERS[dtype]
    if np_dtype is object:
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array.reshape(shape)
    if np_dtype in _NARROW:
        return np.array(values, dtype=np.int64).astype(np_dtype).reshape(shape)
    return np.array(values, dtype=np_dtype).reshape(shape)


def _shape_text(shape) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


def _status_text(error: ServingError) -> str:
    return f"{error.code.name}: {error.message}"


def _is_element_object(value) -> bool:
    return type(value) is dict and not _is_b64(value)


def instances_to_arrays(instances: list, input_dtypes: Dict[str, int]) -> Dict[str, np.ndarray]:
    """FillTensorMapFromInstancesList: one example per element, the batch dimension prepended."""
    first = instances[0]
    if type(first) is not dict and len(input_dtypes) > 1:
        raise invalid("instances is a plain list, but expecting list of objects as multiple input tensors required "
                      "as per tensorinfo_map")
    objects = _is_element_object(first)
    names = sorted(input_dtypes)
    values: Dict[str, list] = {}
    shapes: Dict[str, List[int]] = {}
    sizes: Dict[str, int] = {}

    def add(item, name):
        if name not in input_dtypes:
            raise invalid(f"JSON object: does not have named input: {name}")
        shape = dense_shape(item)
        out = values.setdefault(name, [])
        before = len(out)
        fill_values(item, shape, input_dtypes[name], out)
        size = len(out) - before
        if name not in sizes:
            sizes[name], shapes[name] = size, shape
        elif sizes[name] != size:
            raise invalid(f"Expecting tensor size: {sizes[name]} but got: {size}")
        elif shapes[name] != shape:
            raise invalid(f"Expecting shape {_shape_text(shapes[name])} but got: {_shape_text(shape)}")

    for index, element in enumerate(instances):
        if objects:
            if not _is_element_object(element):
                raise invalid(f"Expecting object but got list at item {index} of input list")
            for name, item in element.items():
                try:
                    add(item, name)
                except ServingError as e:
                    raise invalid(f"Failed to process element: {index} key: {name} of 'instances' list. Error: "
                                  f"{_status_text(e)}") from None
            if set(element) != set(names):
                raise invalid(f"Failed to process element: {index} of 'instances' list. JSON object: "
                              f"{value_text(element)} keys must be equal to: {','.join(names)}")
        else:
            if _is_element_object(element):
                raise invalid(f"Expecting value/list but got object at item {index} of input list")
            try:
                add(element, names[0])
            except ServingError as e:
                raise invalid(f"Failed to process element: {index} of 'instances' list. Error: "
                              f"{_status_text(e)}") from None
    return {name: to_array(values[name], [len(instances)] + shapes[name], input_dtypes[name]) for name in values}


def inputs_to_arrays(inputs, input_dtypes: Dict[str, int]) -> Dict[str, np.ndarray]:
    """FillTensorMapFromInputsMap: tensors exactly as given (columnar); extra keys are ignored."""
    if type(inputs) is not dict or _is_b64(inputs):
        if len(input_dtypes) > 1:
            raise invalid("inputs is a plain value/list, but expecting an object as multiple input tensors required "
                          "as per tensorinfo_map")
        (name, dtype), = input_dtypes.items()
        return {name: _column(inputs, dtype)}
    arrays = {}
    for name in sorted(input_dtypes):
        if name not in inputs:
            raise invalid(f"Missing named input: {name} in 'inputs' object.")
        arrays[name] = _column(inputs[name], input_dtypes[name])
    return arrays


def _column(value, dtype: int) -> np.ndarray:
    shape = dense_shape(value)
    out: list = []
    fill_values(value, shape, dtype, out)
    return to_array(out, shape, dtype)


def predict_arrays(request: dict, input_dtypes: Dict[str, int]) -> Tuple[Dict[str, np.ndarray], bool]:
    """(input arrays, row format?) of a parsed :predict body, once its signature is known."""
    has_instances, has_inputs = "instances" in request, "inputs" in request
    if has_instances and has_inputs:
        raise invalid(f"JSON Value: {value_text(request)} Not formatted correctly expecting only one of 'inputs' or "
                      f"'instances' keys to exist ")
    if has_instances:
        instances = request["instances"]
        if type(instances) is not list:
            raise invalid(f"JSON Value: {value_text(request)} Excepting 'instances' to be an list/array")
        if not instances:
            raise invalid(f"JSON Value: {value_text(request)} No values in 'instances' array")
        return instances_to_arrays(instances, input_dtypes), True
    if has_inputs:
        return inputs_to_arrays(request["inputs"], input_dtypes), False
    raise invalid("Missing 'inputs' or 'instances' key")


def signature_name(request: dict) -> str:
    value = request.get("signature_name", "")
    if type(value) is not str:
        raise invalid(f"JSON Value: {value_text(request)} not formatted correctly. 'signature_name' key must be a "
                      f"string value.")
    return value


# --- classify / regress bodies -> Input proto ---

def _feature_error(name: str, value) -> ServingError:
    return invalid(f"Feature: {name} has element with unexpected JSON type: {json_type(value)}")


_KIND_NAMES = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64", None: "UNKNOWN"}


def fill_example(example, features) -> None:
    """MakeExampleFromJsonObject."""
    if type(features) is not dict:
        raise invalid(f"Example must be JSON object but got JSON {json_type(features)}")
    for name, content in features.items():
        feature = example.features.feature[name]
        feature.Clear()
        for value in (content if type(content) is list else [content]):
            kind = type(value)
            if value is None or kind is list or (kind is dict and not _is_b64(value)):
                raise _feature_error(name, value)
            if kind is bool or kind is int:
                wanted = "int64_list"
            elif kind is float:
                wanted = "float_list"
            else:
                wanted = "bytes_list"
            current = feature.WhichOneof("kind")
            if current is not None and current != wanted:
                raise invalid(f"Unexpected element type in feature: {name} expecting type: {_KIND_NAMES[current]}")
            if kind is bool:
                feature.int64_list.value.append(1 if value else 0)
            elif kind is int:
                if value >= 2 ** 63:
                    raise invalid(f"Feature: {name} has uint64 element. Only int64 is supported.")
                feature.int64_list.value.append(value)
            elif kind is float:
                if math.isfinite(value) and not -FLOAT32_MAX <= value <= FLOAT32_MAX:
                    raise _lossy(value, "float")
                feature.float_list.value.append(value)
            elif kind is str:
                feature.bytes_list.value.append(utf8(value))
            else:
                feature.bytes_list.value.append(decode_b64(value))
        if feature.WhichOneof("kind") is None:
            feature.SetInParent()


def fill_input(input_proto, request: dict) -> None:
    """FillClassifyRegressRequestFromJson: `context` and `examples` into a tensorflow.serving.Input."""
    has_context = "context" in request
    if has_context:
        fill_example(input_proto.example_list_with_context.context, request["context"])
    if "examples" not in request:
        raise invalid(f"JSON Value: {value_text(request)} When method is classify, key 'examples' is expected and "
                      f"was not found")
    examples = request["examples"]
    if type(examples) is not list:
        raise invalid(f"JSON Value: {value_text(request)} Expecting 'examples' value to be an list/array")
    if not examples:
        raise invalid(f"JSON Value: {value_text(request)} 'examples' value is an empty array")
    target = input_proto.example_list_with_context if has_context else input_proto.example_list
    for features in examples:
        fill_example(target.examples.add(), features)


# --- outputs -> JSON text (MakeJsonFromTensors) ---

def format_float(value) -> str:
    """Shortest round-trip text for the value's own width, `.0` on whole numbers, NaN/Infinity/-Infinity."""
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    text = str(value) if isinstance(value, (np.float32, np.float16)) else repr(number)
    return text if ("." in text or "e" in text) else text + ".0"


def _string_text(value: bytes, as_bytes: bool) -> str:
    if as_bytes:
        return '{"b64":"' + base64.b64encode(value).decode("ascii") + '"}'
    return json.dumps(value.decode("utf-8", "surrogateescape"), ensure_ascii=False)


def _leaf_formatter(array: np.ndarray, alias: str) -> Callable:
    kind = array.dtype.kind
    if kind == "f":
        return format_float
    if kind == "b":
        return lambda v: "true" if v else "false"
    if kind in "iu":
        return lambda v: str(int(v))
    if array.dtype == object or kind == "S":
        as_bytes = alias.endswith("_bytes")
        return lambda v: _string_text(v if isinstance(v, bytes) else str(v).encode(), as_bytes)
    raise invalid(f"Failed to write JSON value for tensor type: {array.dtype}")


def array_text(array: np.ndarray, alias: str) -> str:
    """One tensor as nested JSON lists (a scalar as a bare value)."""
    leaf = _leaf_formatter(array, alias)
    if array.ndim == 0:
        return leaf(array[()])
    if array.dtype.kind == "f" and array.ndim == 1:
        return "[" + ",".join(map(leaf, array)) + "]"

    def nested(a):
        if a.ndim == 1:
            return "[" + ",".join(map(leaf, a)) + "]"
        return "[" + ",".join(nested(x) for x in a) + "]"
    return nested(array)


def _row_text(array: np.ndarray, alias: str, leaf) -> List[str]:
    if array.ndim == 1:
        return [leaf(v) for v in array]
    return [array_text(row, alias) for row in array]


def predict_text(outputs: Dict[str, np.ndarray], row: bool) -> str:
    """`{"predictions": ...}` for row requests, `{"outputs": ...}` for columnar ones."""
    if not outputs:
        raise invalid("Cannot convert empty tensor map to JSON")
    names = sorted(outputs)
    if not row:
        if len(names) == 1:
            return '{"outputs":' + array_text(outputs[names[0]], names[0]) + "}"
        return '{"outputs":{' + ",".join(json.dumps(n) + ":" + array_text(outputs[n], n) for n in names) + "}}"
    batch = None
    for name in names:
        value = outputs[name]
        if value.ndim == 0:
            raise invalid(f"Tensor name: {name} has no shape information ")
        if batch is not None and value.shape[0] != batch:
            raise invalid(f"Tensor name: {name} has inconsistent batch size: {value.shape[0]} expecting: {batch}")
        batch = value.shape[0]
    columns = {n: _row_text(outputs[n], n, _leaf_formatter(outputs[n], n)) for n in names}
    if len(names) == 1:
        return '{"predictions":[' + ",".join(columns[names[0]]) + "]}"
    keys = [json.dumps(n) + ":" for n in names]
    rows = ["{" + ",".join(k + columns[n][i] for k, n in zip(keys, names)) + "}" for i in range(batch)]
    return '{"predictions":[' + ",".join(rows) + "]}"


def classify_text(result) -> str:
    rows = []
    for classifications in result.classifications:
        rows.append("[" + ",".join("[" + json.dumps(c.label, ensure_ascii=False) + "," +
                                   format_float(np.float32(c.score)) + "]" for c in classifications.classes) + "]")
    return '{"results":[' + ",".join(rows) + "]}"


def regress_text(result) -> str:
    return '{"results":[' + ",".join(format_float(np.float32(r.value)) for r in result.regressions) + "]}"


def error_text(message: str) -> str:
    return json.dumps({"error": message})
