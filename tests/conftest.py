"""Fixtures shared by the test modules."""
import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    """Every async test (@pytest.mark.anyio) runs on asyncio and on trio."""
    if request.param == "trio":
        # anyio 4's trio backend calls trio APIs (e.g. to_thread's abandon_on_cancel) that older trios lack.
        pytest.importorskip("trio", minversion="0.32")
    return request.param
