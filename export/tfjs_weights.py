"""TF.js weight shards and their manifest, with optional float16 / uint8 quantization.

The byte format is the one `tensorflowjs.write_weights` writes and `@tensorflow/tfjs` reads:
the weights of one group are concatenated (little-endian, C order) and cut into shards of
4 MiB, named `group1-shard1of2.bin`, ...; the manifest lists every weight's name, shape and
dtype (always the *original* dtype), plus a `quantization` entry for quantized ones.
The quantization math (float16 cast; uint8 affine with the range nudged so 0.0 is exact, as
TFLite does) is `tensorflowjs.quantization.quantize_weights`'s, reproduced here because
`import tensorflowjs` drags in TensorFlow Decision Forests, JAX and Flax (seconds, and a banner)
for some 40 lines of numpy; tests check that the bytes and manifest match the converter's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHARD_BYTES = 4 * 1024 * 1024  # the stock converter's default: the largest file browsers cache
QUANTIZE_CHOICES = (None, "float16", "uint8")


@dataclass(frozen=True)
class WeightEntry:
    name: str  # the name tfjs-layers looks the weight up by, e.g. "dense/kernel"
    data: np.ndarray
    quantizable: bool = True  # False keeps an exact rewrite (e.g. Normalization's scale) in float32


def _as_manifest_dtype(data: np.ndarray) -> np.ndarray:
    if data.dtype in (np.float16, np.float64):
        return data.astype(np.float32)
    if data.dtype == np.int64:
        return data.astype(np.int32)
    if data.dtype not in (np.float32, np.int32, np.uint8, np.bool_):
        raise ValueError(f"weight dtype {data.dtype} cannot be stored for TF.js")
    return data


def quantize(data: np.ndarray, dtype: str) -> tuple[np.ndarray, dict]:
    """Quantize float32 `data` to `dtype` ("float16" or "uint8"); returns (bytes array, manifest info)."""
    if dtype == "float16":
        return data.astype(np.float16), {"dtype": "float16"}
    if dtype != "uint8":
        raise ValueError(f"unknown quantization {dtype!r}")
    min_val = float(np.float64(data.min()))
    max_val = float(np.float64(data.max()))
    if min_val == max_val:
        return np.zeros_like(data, dtype=np.uint8), {"dtype": "uint8", "min": min_val, "scale": 1.0}
    quant_max = np.iinfo(np.uint8).max
    scale = (max_val - min_val) / quant_max
    if min_val <= 0 <= max_val:
        zero_point = np.round((0 - min_val) / scale)
        min_val = -zero_point * scale
        max_val = quant_max * scale + min_val
    quantized = np.round((data.clip(min_val, max_val) - min_val) / scale).astype(np.uint8)
    return quantized, {"dtype": "uint8", "min": float(min_val), "scale": float(scale)}


def write_shards(entries: list[WeightEntry], out_dir: Path, *, quantize_to: str | None = None,
                 shard_bytes: int = SHARD_BYTES) -> tuple[list[dict], list[Path]]:
    """Write one weight group as shards into `out_dir`; return (weightsManifest, shard paths)."""
    if quantize_to not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize_to!r}")
    specs: list[dict] = []
    blobs: list[bytes] = []
    for entry in entries:
        data = np.ascontiguousarray(_as_manifest_dtype(np.asarray(entry.data)))
        spec = {"name": entry.name, "shape": list(data.shape), "dtype": data.dtype.name if data.dtype != np.bool_ else "bool"}
        if quantize_to and entry.quantizable and data.dtype == np.float32:
            data, info = quantize(data, quantize_to)
            spec["quantization"] = {**info, "original_dtype": "float32"}
        specs.append(spec)
        blobs.append(data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes())
    payload = b"".join(blobs)
    count = math.ceil(len(payload) / shard_bytes)  # a model without weights gets no shard, as stock
    paths: list[Path] = []
    for i in range(count):
        path = out_dir / f"group1-shard{i + 1}of{count}.bin"
        path.write_bytes(payload[i * shard_bytes:(i + 1) * shard_bytes])
        paths.append(path)
    return [{"paths": [p.name for p in paths], "weights": specs}], paths
