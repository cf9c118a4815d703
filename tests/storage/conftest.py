"""The file I/O backends the storage tests run against: POSIX everywhere, KvikIO where CUDA
and the kvikio package are present (marked ``gpu``: run by bench/gpu_check.sh)."""
from __future__ import annotations

import pytest

from storage import kvikio_status, make_io


@pytest.fixture(params=["posix", pytest.param("kvikio", marks=pytest.mark.gpu)])
def io_backend(request):
    if request.param == "kvikio" and (why := kvikio_status()) is not None:
        pytest.skip(f"kvikio backend: {why}")
    return make_io(request.param)
