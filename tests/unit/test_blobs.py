"""Workflow blobs: every datatype (BYTES too) round-trips; a damaged blob is a clean error."""

from __future__ import annotations

import numpy as np
import pytest
from test_codec import sample

from smss.errors import StorageUnavailable
from smss.spec import DATATYPES
from smss.workflow.blobs import decode_tensor, encode_tensor, ref_of


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_every_datatype_round_trips(datatype: str) -> None:
    array = sample(datatype)
    blob = encode_tensor(array)
    got = decode_tensor(blob, ref_of(blob))
    assert got.dtype == array.dtype
    assert got.shape == array.shape
    np.testing.assert_array_equal(got, array)


def test_a_truncated_bytes_blob_is_storage_unavailable() -> None:
    blob = encode_tensor(sample("BYTES"))
    with pytest.raises(StorageUnavailable):
        decode_tensor(blob[:-3])
