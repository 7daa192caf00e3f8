# A kernel that never returns, for testing what a real deadlock in native code does to the engine: no timeout,
# cancel scope or signal can end this call, and it checks no stop flag. Only the process's exit ends it.
from posix.unistd cimport sleep


def hang():
    """Blocks the calling thread forever, without the GIL."""
    with nogil:
        while True:
            sleep(3600)
