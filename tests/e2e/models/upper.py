"""A BYTES model: upper-cases each string and returns its length (deployed in the tests).

It checks what it is handed, as Triton's Python backend hands it over: a numpy
object array whose elements are ``bytes``; anything else fails the request.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import smss


@smss.model(
    name="upper",
    inputs={"text": ("BYTES", [-1])},
    outputs={"upper": ("BYTES", [-1]), "length": ("INT32", [-1])},
    max_batch_size=8,
    batch_wait_ms=1,
    cpu=0.5,
    memory=128,
)
class Upper:
    def load(self, weights: Any) -> None:
        if weights is not None:
            raise ValueError("upper takes no weights")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        text = inputs["text"]
        if text.dtype != object or not all(type(t) is bytes for t in text.ravel()):
            raise TypeError(f"expected an object array of bytes, got {text.dtype}")
        # str elements on the way out: the platform encodes them as UTF-8.
        upper = [t.decode().upper() for t in text]
        return {"upper": upper, "length": np.array([len(t) for t in text], dtype=np.int32)}
